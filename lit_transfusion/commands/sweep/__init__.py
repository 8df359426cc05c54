"""``python -m lit_transfusion sweep``: a grid of ordinary ``fit`` runs -> a results table.

    python -m lit_transfusion sweep --config configs/sweeps/table6_patch_size.yaml             # run it here
    python -m lit_transfusion sweep --config ... --dry_run                                     # list the runs
    python -m lit_transfusion sweep --config ... --parallel 2                                  # 2 runs at a time
    python -m lit_transfusion sweep --config ... --slurm --partition gpu --time 120 --gpus 1   # SLURM job array
    python -m lit_transfusion sweep --config ... --sbatch                                      # write sweep.sbatch
    python -m lit_transfusion sweep --config ... --only 3                                      # run 3 only
    python -m lit_transfusion sweep --collect runs/sweeps/table6_patch_size                    # rebuild the results

A sweep file (YAML, schema.py: SweepFile) says what to run::

    name: table6_patch_size             # results go to <out>/<name>/ (--out, default runs/sweeps)
    base: configs/shapes/tiny.yaml      # or a list, applied in order like repeated --config
    overrides: {trainer.max_steps: 600} # dotted LightningCLI keys, for every run (a variant or grid may refine one)
    grid:                               # cartesian product: dotted key -> list of values
      model.init_args.patch_size: [1, 2, 4]
    variants:                           # named sets of overrides (ablations touching several keys)
      - {name: causal, model.init_args.image_attention: causal}
      - {name: bidirectional}
    seeds: [0, 1]                       # each run sets seed_everything and model.init_args.seed
    budgets: [2.0e+12, 8.0e+12]         # optional: train each run for a compute budget (6·N·D FLOPs), not max_steps
    compare: {reference: bidirectional, metrics: [val/fid]}   # optional (needs budgets): equal-compute analysis
    #   claims: [{metric: val/fid, arm: bidirectional, reference: causal, direction: lower}]  # verdicts (no budgets
    #   needed); floors: {val/caption_acc: 0.16}  (a number, [low, high] or "<file.json>:<dotted.key>")
    metrics: [val/cond_gap, val/fid]    # what results.md and curves.png show (results.csv has every val/ metric)
    parallel: 1                         # local runs at a time; each gets cores // parallel threads
    slurm: {partition: gpu, time: 120, gpus: 1, cpus: 8, mem_gb: 32, setup: ["source .venv/bin/activate"]}

Runs are budgets × variants × grid points × seeds (grid or variants may be absent, not both; budgets may be
absent), ordered seed-major, then by budget, so the first seed of every setting finishes first; ``--dry_run``
prints them with their index. The whole file is checked before any run starts: every run's full argument list
goes through the Transfusion parser (no model is built), and an error names the file, the section and the key.

Equal compute (``budgets``, ``compare``): each run of a budget gets ``callbacks.flops.FlopsBudget`` with that
budget, which sets its ``trainer.max_steps`` to the steps whose 6·N·D spends it (N: the parameters a position
uses; D: non-pad positions, each text token, image patch or image code counting one), so the configured
``trainer.max_steps`` is overridden (a sweep with budgets may not set it) and the learning-rate schedule ends at
the budget's last step; the run validates at that step. Budgets are written as numbers (YAML reads ``2e12``
without a dot as text; that is accepted too). The run id carries the budget (``linear-budget2e12-seed0``), its
*family* is the id less budget and seed (a variant name and grid point), results.csv gets ``family`` and
``budget`` columns. ``compare`` (``reference``: a family; ``metrics``: default the sweep's ``metrics``) writes
``equal_flops.md`` and ``equal_flops.png`` into the sweep directory (with results.md, and again by ``--collect``):
each metric's final value against training FLOPs per family and budget, a power law per family fitted through
every seed's point, and the FLOP ratio at which each family matches the reference (``equal_flops.py``).

The files, one job each:

    schema.py       the sweep file's schema (dataclasses jsonargparse checks) and the loaded Sweep
    load.py         reading a sweep file: its types through jsonargparse, then what types cannot say
    typecheck.py    a value against a type (jsonargparse), and where a rejected file went wrong
    expand.py       runs, run ids and directories, each run's fit command line
    validate.py     every run's arguments through the Transfusion parser before any run starts
    runner.py       runs here, in subprocesses, several at a time; skip, resume, retry
    slurm.py        a submitit job array, or an sbatch script of --only i tasks
    results.py      results.csv / .md, curves.csv / .png, hparams/ from the run directories (--collect)
    equal_flops.py  power-law fits and the FLOP ratio to match (equal_flops.md / .png)
    claims.py       the paper's claims (compare.claims) judged by stats.verdict from the seeds' intervals
    direction.py    which way a metric improves
    panel.py        what every figure panel ends with
    main.py         the command: its options (a typed signature) and what it does with them
"""
