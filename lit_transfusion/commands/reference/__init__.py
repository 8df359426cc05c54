"""Is my run converging? A reference band of the main job over seeds, and a run read against it.

    python -m lit_transfusion reference add RUN_DIR [--name NAME] [--into results/main_job] [--config FILE]
                                               [--allow_unfinished]
    python -m lit_transfusion reference band [--runs results/main_job] [--out results/reference] [--min_runs 3]
                                             [--window 250] [--names [A,B,...]]
    python -m lit_transfusion reference overlay RUN_DIR_OR_ENTRY [--band results/reference] [--out DIR]
    python -m lit_transfusion reference steps [RUN,RUN,...] [--metric val/cond_gap] [--band results/reference]
                                              [--out FILE]

add      copies a finished fit run of the main job (runs/<name>/version_N: its TensorBoard event files and
         metrics.json) into <into>/<name>/ as small text files: metrics.json, config.yaml, hparams.yaml,
         scalars.csv (every TensorBoard scalar: tag, step, value) and summary.json (final key metrics, steps,
         wall seconds, steps/s, machine, precision, torch, parameters); then rewrites <into>/runs.md, a table of
         every run there. The default name is <CPU class>-seed<seed_everything>, e.g. avx512bf16-seed0.
band     from the runs under --runs that share a config (config.yaml equal but for seed_everything and the
         logger's name/version/save_dir; several configs: the largest group, said so; a tie: choose with --names)
         writes <out>/band.csv (tag, step, flops, n, mean, low, high, min, max), band.json (the settings, the runs),
         band.md (how it was made, the runs, the final values) and band.png (a panel per metric against step).
overlay  reads one run (a live run directory with event files, or an entry of --runs with scalars.csv) against
         the band: overlay.md (printed too) says at every band step the run has whether its value lies inside the
         band's seed [min, max], above or below it, and reads the final step; overlay.png draws the run on the band.
steps    several runs side by side on one metric: per band step, the band and each run's value and position.

Steps are the trainer's global step (optimizer steps done, as in metrics.json; TensorBoard's step + 1). Validation
metrics are compared at the validation steps every run has; train/ losses are averaged over windows of --window
steps (a window is labelled by its last step; one a run has not logged to its end is left out). FLOPs are 6·N·D:
N the parameters a position uses (``callbacks.flops.active_parameters`` of the model built from the run's
config.yaml and hparams.yaml on the meta device, no weights), D the run's ``train/positions_seen`` at that step.
"""
