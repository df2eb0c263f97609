"""Quality per byte: the KL-divergence scoreboard (`mixq eval`), the per-unit loss
measurements (`mixq measure`) and the knapsack planner over them (`mixq plan --measure`).
See docs/quality.md."""
