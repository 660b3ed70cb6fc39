"""Loads a safetensors file written by our worker into timm the way users do,
`timm.create_model(name, pretrained=True, num_classes=K,
pretrained_cfg_overlay=dict(file=PATH, num_classes=K))` (the overlay's num_classes
keeps timm from dropping the classifier when K differs from 1000)
(strict key matching), runs it in eval mode on an .npy input and saves the logits.
Used by tests/tests/parity_models.rs.
"""
import argparse

import numpy as np
import timm
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    model = timm.create_model(a.model, pretrained=True, num_classes=a.num_classes,
                              pretrained_cfg_overlay=dict(file=a.weights, num_classes=a.num_classes))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(a.input)))
    np.save(a.output, logits.numpy())


if __name__ == "__main__":
    main()
