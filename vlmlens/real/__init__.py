"""smol-shapes: a VLM made of real pretrained parts (SmolLM2-135M-Instruct + EfficientNet-Lite0)
joined by a projector trained on the shapes world and real photos. See build.py and train.py."""
