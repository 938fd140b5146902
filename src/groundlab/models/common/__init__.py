"""Parts shared by the models: backbones and their weights, text encoder, deformable attention, position
encodings, box ops, key-layout conversions."""
