"""What a PUMA Hub repository carries besides the two model files: the model card templates (`*.j2`) and the
Inference Endpoints handler (`handler.py`, copied to the repository root). Installed as `puma_hub_card`."""
