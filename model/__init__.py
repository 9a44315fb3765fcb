"""Networks of the diffusion video autoencoder: pure architecture, loaded by model.pretrained."""
