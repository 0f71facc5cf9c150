"""The machinery behind Gemma/train_deepspeed.py and its companion tools, one module per responsibility, in the
order data flows through a run:

    config            the config schema: typed dataclasses, every default and why (standard library only)
    settings          config.json + ablation profile + --set -> a validated Config, every problem at once
    gemma             what the tool knows about Gemma checkpoints without torch: families, refusals, turn format
    chat_format       the turn format learned from the tokenizer's chat template
    prompts           prompt sections, the user turn, token ids and labels (PromptEncoder)
    data              data files -> checked records -> encoded splits and their statistics
    data_cache        the prepared-data cache: entry keys, the builders' lock, complete-or-absent entries
    batching          the supervised-positions collator, length-grouped sampling, padding-free batches
    deepspeed_config  the generated ZeRO-3 config, and the user's own checked against config.json
    modeling          the model's config, loading it, what is trained (towers frozen), MoE blocks as ZeRO-3 leaves
    lora              LoRA with peft: which modules get adapters, wrapping the model, the merged final/ model
    memory_plan       memory per GPU and node for --dry_run and offload "auto" (estimates)
    preflight         what the installed libraries accept, checked before any weights load
    run_identity      what a run is (settings, data hashes, model fingerprint) and what a resume may change
    runtime           the process group, this machine's work-arounds, logging, signals, clean shutdown
    deepspeed_ops     DeepSpeed's compiled ops: the environment's cache, stale build locks
    activation_offload  activation checkpointing with the saved layer inputs in CPU memory
    trainer           TrainingArguments, our Trainer subclass and its callbacks, final model, results
    faults            preemption (SIGTERM) and divergence (NaN) during training
    evaluation        test-set loss, greedy answers or answer-choice likelihoods, under ZeRO-3
    metrics           the metric registry shared by the evaluation and the comparison
    outputs           output file names, atomic writes, output-dir checks and lock, checkpoints, resuming, disk
    dry_run           the --dry_run report
    test_time         test-time ablation: its checks, results and label
    designs           study designs: sections, leave_one_out, history_lengths (Gemma/run_study.py --design)
    study             a study's runs, their states and time left, the SLURM job array (Gemma/run_study.py)
    bootstrap         bootstrap intervals of differences (Gemma/compare_ablations.py)
    comparison        finished runs -> comparable rows with intervals (Gemma/compare_ablations.py)
    errors            UserError and the exit codes every tool uses

Modules on the path of --help and config validation (config, settings, gemma, errors, outputs, metrics,
deepspeed_config, run_identity, runtime, deepspeed_ops) import nothing beyond the standard library at module level.
"""
