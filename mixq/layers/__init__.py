"""Model building blocks that compute with weights in their stored formats."""
