//! The model registry, keyed by timm names, with each model's default input
//! resolution, test resolution and centre-crop fraction.

use crate::error::VisionError;
use crate::model::{ModelConfig, Network};
use crate::models::resnet::{self, ResNet, ResNetDef};
use tch::nn;

/// One registered architecture.
#[derive(Debug)]
pub struct ModelSpec {
    /// timm's name (`resnet50`).
    pub name: &'static str,
    /// Family (file under `models/`).
    pub family: &'static str,
    /// Default training resolution (square), as timm's `input_size`.
    pub input_size: i64,
    /// Default evaluation resolution (square).
    pub test_input_size: i64,
    /// Default fraction of the resized image kept by the evaluation centre crop.
    pub crop_pct: f64,
    /// Builds the variables under the given path and returns the network.
    pub build: fn(&nn::Path, &ModelConfig) -> Box<dyn Network>,
}

macro_rules! resnet_spec {
    ($name:literal, $def:expr) => {
        ModelSpec {
            name: $name,
            family: "resnet",
            input_size: 224,
            test_input_size: 224,
            crop_pct: 0.95,
            build: |root, config| -> Box<dyn Network> {
                const DEF: ResNetDef = $def;
                Box::new(ResNet::new(root, DEF, config))
            },
        }
    };
}

static MODELS: &[ModelSpec] = &[
    resnet_spec!("resnet18", resnet::RESNET18),
    resnet_spec!("resnet34", resnet::RESNET34),
    resnet_spec!("resnet50", resnet::RESNET50),
    resnet_spec!("resnet101", resnet::RESNET101),
    resnet_spec!("resnet152", resnet::RESNET152),
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
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
