//! Model families, one file each, named as in timm.

pub mod efficientnet;
pub mod regnet;
pub mod resnet;
pub mod vision_transformer;
