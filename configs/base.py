"""The full default config: TALLRec rec tuning of SmolLM2-135M-Instruct (int8 base, LoRA on q, v)."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "base"
  c.seed = 0
  c.stages = ("rec",)  # ("instruct", "rec"): Alpaca instruction tuning first, then rec tuning.
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices.
  # Multi-process runs: set these (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1

  c.model = ConfigDict(dict(
      source="smollm2-135m-instruct",  # or a Hugging Face folder / .gguf file
      preset="",  # e.g. "tiny": a random model of that shape instead of `source`
      tokenizer="smollm2",  # with `preset`: "smollm2" or "bytes"
      dtype="float32",
      quantize="int8",
      # Recompute each decoder layer in the backward pass: "" none, "full" (keep each layer's input), "dots" (also
      # the projections' outputs). Saves GPU/TPU memory; XLA:CPU merges the recomputation back, so none on CPU.
      remat="",
      # "custom" (fastest measured on CPU), "xla" or "cudnn" (GPU): jax.nn.dot_product_attention's implementations.
      attention_impl="custom",
  ))
  c.lora = ConfigDict(dict(r=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"),
                           init_from=""))  # a PEFT adapter folder to start from
  c.data = ConfigDict(dict(
      domain="book",  # the item word of the prompts: built-in data for movie and book, own files any word
      shots=64,  # TALLRec few-shot training set size; <= 0 for the whole pool
      fewshot_seed=0,
      split_seed=0,
      book_valid_size=1000,  # book: valid.json is split into this validation set + training pool
      valid_size=128,  # validation subset for early stopping (TALLRec: <= 128 samples); <= 0: all
      test_size=-1,  # <= 0: the whole test set; 0 skips the test evaluation
      cutoff_len=512,
      train_on_inputs=True,
      template="alpaca",
      pad_multiple=64,  # fewer distinct shapes, fewer compiles of the 30-layer model
      eval_widths=6,  # evaluation pads to at most this many widths chosen from the data; 0: pad_multiple
      # Your own TALLRec-format JSON files (TALLRec's --train_data_path / --val_data_path) instead of the
      # built-in splits, about items of any `domain` word ("game": "...like the target game..."). Absolute, or
      # relative to the working directory or CLCLM_DATA; test may stay empty with test_size=0.
      files=ConfigDict(dict(train="", valid="", test="")),
      # Test records that are also training records make the test AUC score prompts the model trained on, so
      # such data stops the run; True lets it go on with a warning (e.g. a deliberate memorisation check).
      allow_test_in_train=False,
  ))
  c.instruct = ConfigDict(dict(file="instruct/alpaca_data_1k.json", num_examples=-1, batch_size=16,
                               max_steps=50, lr=3e-4, warmup_steps=5))
  c.train = ConfigDict(dict(
      batch_size=16,  # examples per optimizer step (global)
      micro_batch_size=8,  # gradient accumulation: batch_size / micro_batch_size micro-batches
      num_epochs=5,
      max_steps=-1,  # > 0 overrides num_epochs
      eval_every=5,  # steps between validation AUCs (TALLRec: 10; our runs have ~20 steps)
      patience=10,  # evaluations without a better validation AUC before stopping
      checkpoint_every=10,
      eval_batch_size=16,
  ))
  c.optim = ConfigDict(dict(lr=1e-4, warmup_steps=2, schedule="linear", max_grad_norm=1.0,
                            b1=0.9, b2=0.999, weight_decay=0.0))
  c.loss_weights = ConfigDict({"lm": 1.0})
  c.lock()
  return c
