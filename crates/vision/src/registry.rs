//! The model registry, keyed by timm names: every architecture of Table 3 of
//! "ResNet strikes back" (arXiv 2110.00476) with its default training and
//! evaluation resolutions for the A1/A2 and the A3 procedures.
//!
//! Where the resolutions come from (timm 1.0.31's `pretrained_cfg`):
//!
//! * Models with RSB weights in timm (`.a1_in1k` / `.a3_in1k` tags: the
//!   ResNets, `resnet50d`, `seresnet50`, `resnext50_32x4d`, `ecaresnet50t`):
//!   A1/A2 train at the `.a1_in1k` `input_size` (224) and evaluate there with
//!   its `crop_pct` (0.95), as the paper reports (timm's `test_input_size` 288
//!   at crop 1.0 is a test-time resolution boost the paper does not use); A3
//!   trains at the `.a3_in1k` `input_size` (160) and evaluates at its
//!   `test_input_size` / `test_crop_pct` (224, 0.95).
//! * The others (no RSB tag in timm): A1/A2 from the default tag's
//!   `input_size` and `crop_pct` (the tag is named on each entry). A3 keeps
//!   that evaluation and trains at the paper's A3 ratio 160/224 of the A1
//!   resolution rounded to a multiple of 16 (224 -> 160, 240 -> 176,
//!   256 -> 176, 288 -> 208, 320 -> 224); this rule is ours, not timm's.

use crate::error::VisionError;
use crate::model::{ModelConfig, Network};
use crate::models::efficientnet::{self, EfficientNet};
use crate::models::regnet::{self, RegNet};
use crate::models::resnet::{self, ResNet};
use crate::models::vision_transformer::{self, VisionTransformer};
use tch::nn;

/// One registered architecture.
#[derive(Debug)]
pub struct ModelSpec {
    /// timm's name (`resnet50`).
    pub name: &'static str,
    /// Family (file under `models/`).
    pub family: &'static str,
    /// A1/A2 training resolution (square), as timm's `input_size`.
    pub input_size: i64,
    /// A1/A2 evaluation resolution (square).
    pub test_input_size: i64,
    /// A1/A2 fraction of the resized image kept by the evaluation centre crop.
    pub crop_pct: f64,
    /// A3 training resolution.
    pub a3_input_size: i64,
    /// A3 evaluation resolution.
    pub a3_test_input_size: i64,
    /// A3 evaluation crop fraction.
    pub a3_crop_pct: f64,
    /// The timm `pretrained_cfg` tags the resolutions were taken from.
    pub resolution_source: &'static str,
    /// Builds the variables under the given path and returns the network.
    pub build: fn(&nn::Path, &ModelConfig) -> Box<dyn Network>,
}

/// `(input_size, test_input_size, crop_pct)` of one procedure.
type Res = (i64, i64, f64);

/// RSB-tagged models: `.a1_in1k` at 224 / 0.95, `.a3_in1k` 160 -> 224 / 0.95.
const RSB: (Res, Res, &str) =
    ((224, 224, 0.95), (160, 224, 0.95), "timm .a1_in1k (input_size, crop_pct) and .a3_in1k");

macro_rules! spec {
    ($name:literal, $family:literal, $res:expr, $net:ident, $def:expr) => {{
        const RES: (Res, Res, &str) = $res;
        ModelSpec {
            name: $name,
            family: $family,
            input_size: RES.0 .0,
            test_input_size: RES.0 .1,
            crop_pct: RES.0 .2,
            a3_input_size: RES.1 .0,
            a3_test_input_size: RES.1 .1,
            a3_crop_pct: RES.1 .2,
            resolution_source: RES.2,
            build: |root, config| -> Box<dyn Network> { Box::new($net::new(root, $def, config)) },
        }
    }};
}

/// Resolutions from a default tag without RSB weights: evaluate at the train
/// resolution with its crop, A3 at 160/224 of it (multiple of 16).
macro_rules! default_tag {
    ($train:literal, $a3:literal, $crop:literal, $tag:literal) => {
        (($train, $train, $crop), ($a3, $train, $crop), concat!("timm default tag .", $tag))
    };
}

static MODELS: &[ModelSpec] = &[
    spec!("resnet18", "resnet", RSB, ResNet, resnet::RESNET18),
    spec!("resnet34", "resnet", RSB, ResNet, resnet::RESNET34),
    spec!("resnet50", "resnet", RSB, ResNet, resnet::RESNET50),
    spec!("resnet101", "resnet", RSB, ResNet, resnet::RESNET101),
    spec!("resnet152", "resnet", RSB, ResNet, resnet::RESNET152),
    spec!("resnet50d", "resnet", RSB, ResNet, resnet::RESNET50D),
    spec!("seresnet50", "resnet", RSB, ResNet, resnet::SERESNET50),
    spec!(
        "senet154",
        "resnet",
        default_tag!(224, 160, 0.875, "gluon_in1k"),
        ResNet,
        resnet::SENET154
    ),
    spec!("resnext50_32x4d", "resnet", RSB, ResNet, resnet::RESNEXT50_32X4D),
    spec!("ecaresnet50t", "resnet", RSB, ResNet, resnet::ECARESNET50T),
    spec!(
        "ecaresnet269d",
        "resnet",
        default_tag!(320, 224, 0.95, "ra2_in1k"),
        ResNet,
        resnet::ECARESNET269D
    ),
    spec!(
        "regnety_040",
        "regnet",
        default_tag!(224, 160, 0.95, "ra3_in1k"),
        RegNet,
        regnet::REGNETY_040
    ),
    spec!(
        "regnety_080",
        "regnet",
        default_tag!(224, 160, 0.95, "ra3_in1k"),
        RegNet,
        regnet::REGNETY_080
    ),
    spec!(
        "regnety_160",
        "regnet",
        default_tag!(224, 160, 0.95, "sw_in12k_ft_in1k"),
        RegNet,
        regnet::REGNETY_160
    ),
    spec!(
        "regnety_320",
        "regnet",
        default_tag!(224, 160, 0.965, "tv2_in1k"),
        RegNet,
        regnet::REGNETY_320
    ),
    spec!(
        "efficientnet_b0",
        "efficientnet",
        default_tag!(224, 160, 0.875, "ra_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNET_B0
    ),
    spec!(
        "efficientnet_b1",
        "efficientnet",
        default_tag!(240, 176, 0.9, "ra4_e3600_r240_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNET_B1
    ),
    spec!(
        "efficientnet_b2",
        "efficientnet",
        default_tag!(256, 176, 0.875, "ra_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNET_B2
    ),
    spec!(
        "efficientnet_b3",
        "efficientnet",
        default_tag!(288, 208, 0.875, "ra2_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNET_B3
    ),
    spec!(
        "efficientnet_b4",
        "efficientnet",
        default_tag!(320, 224, 0.875, "ra2_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNET_B4
    ),
    spec!(
        "efficientnetv2_rw_s",
        "efficientnet",
        default_tag!(288, 208, 1.0, "ra2_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNETV2_RW_S
    ),
    spec!(
        "efficientnetv2_rw_m",
        "efficientnet",
        default_tag!(320, 224, 1.0, "agc_in1k"),
        EfficientNet,
        efficientnet::EFFICIENTNETV2_RW_M
    ),
    spec!(
        "vit_tiny_patch16_224",
        "vision_transformer",
        default_tag!(224, 160, 0.9, "augreg_in21k_ft_in1k"),
        VisionTransformer,
        vision_transformer::VIT_TINY_PATCH16_224
    ),
    spec!(
        "vit_small_patch16_224",
        "vision_transformer",
        default_tag!(224, 160, 0.9, "augreg_in21k_ft_in1k"),
        VisionTransformer,
        vision_transformer::VIT_SMALL_PATCH16_224
    ),
    spec!(
        "vit_base_patch16_224",
        "vision_transformer",
        default_tag!(224, 160, 0.9, "augreg2_in21k_ft_in1k"),
        VisionTransformer,
        vision_transformer::VIT_BASE_PATCH16_224
    ),
];

/// Every registered model, in registration order.
pub fn registered_models() -> &'static [ModelSpec] {
    MODELS
}

/// Looks a model up by its timm name; an unknown name gets the closest ones.
pub fn find_model(name: &str) -> Result<&'static ModelSpec, VisionError> {
    if let Some(spec) = MODELS.iter().find(|m| m.name == name) {
        return Ok(spec);
    }
    let mut ranked: Vec<(usize, &str)> =
        MODELS.iter().map(|m| (edit_distance(name, m.name), m.name)).collect();
    ranked.sort();
    let suggestions = ranked.iter().take(3).map(|(_, n)| *n).collect::<Vec<_>>().join(", ");
    Err(VisionError::UnknownModel { name: name.to_string(), suggestions })
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_suggests_close_ones() {
        let err = find_model("resnet5").unwrap_err().to_string();
        assert!(err.contains("resnet50"), "{err}");
        assert!(find_model("resnet50").is_ok());
        let err = find_model("efficientnet_b9").unwrap_err().to_string();
        assert!(err.contains("efficientnet_b"), "{err}");
        let err = find_model("vit_small_patch16").unwrap_err().to_string();
        assert!(err.contains("vit_small_patch16_224"), "{err}");
    }

    #[test]
    fn names_are_unique_and_resolutions_sane() {
        let mut names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MODELS.len());
        assert_eq!(MODELS.len(), 25);
        for m in MODELS {
            assert!(m.a3_input_size < m.input_size, "{}", m.name);
            assert_eq!(m.a3_input_size % 16, 0, "{}", m.name);
            assert!(m.crop_pct > 0.0 && m.crop_pct <= 1.0 && m.a3_crop_pct <= 1.0, "{}", m.name);
        }
        let r50 = find_model("resnet50").unwrap();
        assert_eq!((r50.input_size, r50.test_input_size, r50.crop_pct), (224, 224, 0.95));
        assert_eq!((r50.a3_input_size, r50.a3_test_input_size, r50.a3_crop_pct), (160, 224, 0.95));
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
