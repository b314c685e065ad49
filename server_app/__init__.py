"""fedlora's Flower ServerApp."""
