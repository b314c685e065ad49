"""fedlora's Flower ClientApp."""
