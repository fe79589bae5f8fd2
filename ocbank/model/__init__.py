"""The model: WideResNet-50 patch features, scoring, the radius rule and the Detector."""
