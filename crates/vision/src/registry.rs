//! The model registry, keyed by timm names: every architecture of Table 3 of
//! "ResNet strikes back" (arXiv 2110.00476) with its A1/A2 and A3 training
//! and test resolutions.
//!
//! The resolutions are Table 3's (transcribed in `recipes/table3.csv`, which
//! `tests/table3.rs` compares with every entry): A1/A2 train and test at the
//! resolution of the paper that introduced the architecture, A3 trains
//! smaller. Every procedure tests with the centre crop 0.95 (Table 1).

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
    /// A1/A2 training resolution (square; Table 3 "A1/A2 train").
    pub input_size: i64,
    /// A1/A2 test resolution (Table 3 "A1/A2 test").
    pub test_input_size: i64,
    /// A1/A2 fraction of the resized image kept by the test centre crop (0.95).
    pub crop_pct: f64,
    /// A3 training resolution (Table 3 "A3 train").
    pub a3_input_size: i64,
    /// A3 test resolution (Table 3 "A3 test").
    pub a3_test_input_size: i64,
    /// A3 test crop fraction (0.95).
    pub a3_crop_pct: f64,
    /// Builds the variables under the given path and returns the network.
    pub build: fn(&nn::Path, &ModelConfig) -> Box<dyn Network>,
}

/// The test centre-crop fraction of every RSB procedure (the paper's Table 1).
pub const RSB_TEST_CROP_PCT: f64 = 0.95;

/// One entry: name, family, Table 3's `[A1/A2 train, A1/A2 test, A3 train,
/// A3 test]`, the network type and its definition.
macro_rules! spec {
    ($name:literal, $family:literal, [$train:literal, $test:literal, $a3_train:literal, $a3_test:literal], $net:ident, $def:expr) => {
        ModelSpec {
            name: $name,
            family: $family,
            input_size: $train,
            test_input_size: $test,
            crop_pct: RSB_TEST_CROP_PCT,
            a3_input_size: $a3_train,
            a3_test_input_size: $a3_test,
            a3_crop_pct: RSB_TEST_CROP_PCT,
            build: |root, config| -> Box<dyn Network> { Box::new($net::new(root, $def, config)) },
        }
    };
}

/// Table 3's resolutions: `[A1/A2 train, A1/A2 test, A3 train, A3 test]`.
static MODELS: &[ModelSpec] = &[
    spec!("resnet18", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET18),
    spec!("resnet34", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET34),
    spec!("resnet50", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET50),
    spec!("resnet101", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET101),
    spec!("resnet152", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET152),
    spec!("resnet50d", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNET50D),
    spec!("seresnet50", "resnet", [224, 224, 160, 224], ResNet, resnet::SERESNET50),
    spec!("senet154", "resnet", [224, 224, 160, 224], ResNet, resnet::SENET154),
    spec!("resnext50_32x4d", "resnet", [224, 224, 160, 224], ResNet, resnet::RESNEXT50_32X4D),
    spec!("ecaresnet50t", "resnet", [224, 224, 160, 224], ResNet, resnet::ECARESNET50T),
    spec!("ecaresnet269d", "resnet", [320, 416, 256, 320], ResNet, resnet::ECARESNET269D),
    spec!("regnety_040", "regnet", [224, 224, 160, 224], RegNet, regnet::REGNETY_040),
    spec!("regnety_080", "regnet", [224, 224, 160, 224], RegNet, regnet::REGNETY_080),
    spec!("regnety_160", "regnet", [224, 224, 160, 224], RegNet, regnet::REGNETY_160),
    spec!("regnety_320", "regnet", [224, 224, 160, 224], RegNet, regnet::REGNETY_320),
    spec!(
        "efficientnet_b0",
        "efficientnet",
        [224, 224, 160, 224],
        EfficientNet,
        efficientnet::EFFICIENTNET_B0
    ),
    spec!(
        "efficientnet_b1",
        "efficientnet",
        [240, 240, 160, 224],
        EfficientNet,
        efficientnet::EFFICIENTNET_B1
    ),
    spec!(
        "efficientnet_b2",
        "efficientnet",
        [260, 260, 192, 256],
        EfficientNet,
        efficientnet::EFFICIENTNET_B2
    ),
    spec!(
        "efficientnet_b3",
        "efficientnet",
        [300, 300, 224, 288],
        EfficientNet,
        efficientnet::EFFICIENTNET_B3
    ),
    spec!(
        "efficientnet_b4",
        "efficientnet",
        [380, 380, 320, 380],
        EfficientNet,
        efficientnet::EFFICIENTNET_B4
    ),
    spec!(
        "efficientnetv2_rw_s",
        "efficientnet",
        [288, 384, 224, 288],
        EfficientNet,
        efficientnet::EFFICIENTNETV2_RW_S
    ),
    spec!(
        "efficientnetv2_rw_m",
        "efficientnet",
        [320, 384, 256, 352],
        EfficientNet,
        efficientnet::EFFICIENTNETV2_RW_M
    ),
    spec!(
        "vit_tiny_patch16_224",
        "vision_transformer",
        [224, 224, 160, 224],
        VisionTransformer,
        vision_transformer::VIT_TINY_PATCH16_224
    ),
    spec!(
        "vit_small_patch16_224",
        "vision_transformer",
        [224, 224, 160, 224],
        VisionTransformer,
        vision_transformer::VIT_SMALL_PATCH16_224
    ),
    spec!(
        "vit_base_patch16_224",
        "vision_transformer",
        [224, 224, 160, 224],
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
        MODELS.iter().map(|m| (strsim::levenshtein(name, m.name), m.name)).collect();
    ranked.sort();
    let suggestions = ranked.iter().take(3).map(|(_, n)| *n).collect::<Vec<_>>().join(", ");
    Err(VisionError::UnknownModel { name: name.to_string(), suggestions })
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
            // Table 3: A3 trains below A1/A2, and no procedure tests below its training size.
            assert!(m.a3_input_size < m.input_size, "{}", m.name);
            assert!(m.test_input_size >= m.input_size, "{}", m.name);
            assert!(m.a3_test_input_size >= m.a3_input_size, "{}", m.name);
            assert_eq!((m.crop_pct, m.a3_crop_pct), (0.95, 0.95), "{}", m.name);
        }
    }
}
