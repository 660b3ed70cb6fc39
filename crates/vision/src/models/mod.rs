//! Model families, one file each, named as in timm.

pub mod resnet;
