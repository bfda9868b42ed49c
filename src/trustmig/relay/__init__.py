"""Migration data paths in processes of their own: the relay and the agent's handle on it."""
