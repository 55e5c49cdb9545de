"""Training, on top of `models` and `data`: the run's `config`, `build` (config -> model), `weights`
(a run's parameters from every source), the KD `losses` and the `objective`, `optim`, the sharded
`train_state` and step, `checkpoint`, `distributed` start-up, the `trainer` and `sweep`s."""
