"""The one training loop, shared by every family (through ModelFamily) and network (through TrainNetwork)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from library.config.train_config import RunConfig
from library.errors import UserError
from library.families.interface import FamilyModels, ModelFamily
from library.families.registry import get_family
from library.models.lowvram import place_module
from library.train import checkpoint as ckpt
from library.train.attention import configure_training_attention
from library.train.batch_inputs import batch_latents, batch_text
from library.train.epoch_plan import PlannedBatch, plan_epoch
from library.train.hub_upload import HubTarget, HubUploader
from library.train.initial_step import start_position
from library.train.loop_math import all_reduce_mean_, nonfinite_grads, step_generator
from library.train.loss_step import compute_loss
from library.train.network_adapter import build_network
from library.train.optim import set_schedule_free_mode
from library.train.prefetch import Prefetcher, pin_tensors
from library.train.readback import NonFiniteGuard, PendingLosses, StepRecord, loss_is_finite
from library.train.preflight import preflight
from library.train.rescue import (RescueReport, StopSignal, TrainingTerminated, rescue_folders, save_everything,
                                  tell)
from library.train.retention import (epoch_to_remove, every_n_epochs_from_ratio, remove_path, state_window,
                                     step_to_remove)
from library.train.offload_checkpointing import enable_checkpointing
from library.train.scale_out import (ShardingOptions, accelerator_kwargs_handlers, check_sharding_compatible,
                                     deepspeed_sharding, local_share, shard_frozen_model, take_sharding_request)
from library.train.session import Session, TrainResult
from library.train.trackers import init_trackers

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_base_models(cfg: RunConfig, family: ModelFamily, models: FamilyModels, device: torch.device,
                        weight_dtype: torch.dtype) -> None:
    """Freeze the base models, put them on the device in the weight dtype (the VAE in fp32 with --no_half_vae), and
    set up attention and gradient checkpointing."""
    denoiser = models.denoiser
    for module in models.base_modules():
        module.requires_grad_(False)
        module.eval()
    vae_dtype = torch.float32 if cfg.model.no_half_vae else weight_dtype
    kept_off = family.modules_kept_off_device(models, cfg)
    for module, dtype in [(models.vae, vae_dtype), (denoiser, weight_dtype)] + \
            [(te, weight_dtype) for te in models.text_encoders]:
        place_module(module, device, None if dtype == torch.float32 else dtype, kept_off if module is denoiser else ())
    if cfg.training.xformers:
        try:
            denoiser.enable_xformers_memory_efficient_attention()
        except Exception as e:  # not installed, or no CUDA build
            print(f"warning: --xformers: cannot enable xformers attention ({e}); PyTorch SDPA is used instead")
    if cfg.training.gradient_checkpointing:
        enable_checkpointing(denoiser, cfg.environment.cpu_offload_checkpointing)
        denoiser.train()  # diffusers only checkpoints in train mode
    family.after_base_models_prepared(models, cfg, device)


def shard_base_model(family: ModelFamily, models: FamilyModels, options: ShardingOptions,
                     accelerator: Any) -> bool:
    """FSDP-shard the frozen denoiser across the processes (library/train/scale_out.py)."""
    denoiser = models.denoiser
    units = family.sharding_units(models)
    if not units:
        raise UserError(f"FSDP sharding is not available for the {family.__class__.__name__} models")
    if accelerator.num_processes < 2:
        accelerator.print("FSDP config with one process: nothing to shard, the base model stays whole")
        return False
    n = shard_frozen_model(denoiser, units, options)
    accelerator.print(f"FSDP: the frozen {family.denoiser_key} is sharded in {n} blocks + root over "
                      f"{accelerator.num_processes} processes ({local_share(denoiser):.0%} held here); "
                      "the network is replicated")
    return True


def build_session(cfg: RunConfig) -> Session:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from library.train.base_weights import merge_base_weights
    from library.train.data_setup import build_datasets, setup_caches
    from library.train.fused_backward import attach_fused_backward
    from library.train.optim import build_optimizer, build_scheduler

    preflight(cfg)  # everything checkable before the models load: images, prompts, output folder, network module
    log_with = cfg.log.log_with or ("tensorboard" if cfg.log.logging_dir else None)
    if log_with in ("tensorboard", "all") and not cfg.log.logging_dir:
        raise UserError(f"--log_with {log_with} writes TensorBoard logs: give --logging_dir")
    if log_with in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--log_with wandb needs the wandb package: pip install wandb (or the [wandb] extra)")
    # before the Accelerator reads the environment; --deepspeed --zero_stage 3 is the same sharding
    sharding = take_sharding_request() or deepspeed_sharding(cfg)
    check_sharding_compatible(sharding, cfg)
    # without a GPU, cpu=True is what makes accelerate form a gloo group under torchrun (MULTI_CPU)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
                              mixed_precision=cfg.training.mixed_precision, log_with=log_with,
                              project_dir=cfg.log.logging_dir,
                              kwargs_handlers=accelerator_kwargs_handlers(cfg.distributed, torch.cuda.is_available()))
    set_seed(cfg.training.seed)
    configure_training_attention(cfg.training.sdpa_cudnn)
    family = get_family(cfg.family, cfg.model)
    datasets = build_datasets(cfg, accelerator.num_processes, verbose=accelerator.is_main_process)
    weight_dtype = DTYPES[cfg.training.mixed_precision]

    models = family.load_models(weight_dtype)
    merge_base_weights(cfg.network, models.text_encoders, models.denoiser, models.vae)  # before any cast / fp8
    from library.families.sdxl_text import text_options_from
    family.set_text_options(models, text_options_from(cfg.training, cfg.family))  # --max_token_length, ...
    prepare_base_models(cfg, family, models, accelerator.device, weight_dtype)
    device = accelerator.device

    network = build_network(cfg.network_kind, models, cfg)
    # only the encoders the network trains leave eval mode (FLUX's T5 without train_t5xxl stays in it: no dropout on
    # a frozen encoder, so a partially cached run equals an uncached one)
    trained_tes = family.text_encoders_trained(models, network.module, network.trains_text_encoder)
    for te, trained in zip(models.text_encoders, trained_tes):
        if trained:
            te.train()
            if cfg.training.gradient_checkpointing and hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()
    net_dtype = weight_dtype if (cfg.training.full_bf16 or cfg.training.full_fp16) else torch.float32
    network.module.to(device, net_dtype)
    network.module.train()
    sharded = sharding is not None and shard_base_model(family, models, sharding, accelerator)
    if cfg.training.torch_compile:  # per block, once the network is attached (library/train/compile.py)
        from library.train.compile import compile_for_training

        compile_for_training(models.denoiser, cfg.training.dynamo_backend, sharded)

    text_cache = setup_caches(cfg, family, models, datasets, accelerator, trained_tes)

    batches_per_epoch = sum(len(d.epoch_batches(0)) for d in datasets)
    if batches_per_epoch == 0:
        raise UserError(f"{cfg.training.dataset_config}: the datasets give no batches")
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.training.gradient_accumulation_steps)
    total_steps = cfg.training.max_train_steps
    if cfg.training.max_train_epochs:
        total_steps = cfg.training.max_train_epochs * steps_per_epoch

    params = network.param_groups(cfg)
    optimizer = build_optimizer(params, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    # only the optimizer goes through accelerate (mixed-precision scaling); the scheduler steps once per optimizer
    # step whatever the process count. --save_state writes both itself, without pickle (library/train/checkpoint.py)
    for d in datasets:  # token warm-up counts steps against the whole run
        d.set_progress(0, total_steps)
    optimizer = accelerator.prepare(optimizer)
    fused = attach_fused_backward(optimizer, cfg, accelerator)  # --fused_backward_pass: steps inside the backward
    return Session(cfg, family, accelerator, models, network, datasets, optimizer, scheduler, text_cache,
                   weight_dtype, total_steps, batches_per_epoch, sharded, fused)


class Trainer:
    def __init__(self, session: Session):
        self.s = session
        self.state = ckpt.LoopState(num_processes=session.accelerator.num_processes,
                                    batches_per_epoch=session.batches_per_epoch, seed=session.cfg.training.seed)
        self.losses: list[float] = []
        self._evaluator = None
        self._bar: tqdm | None = None
        self._stop = StopSignal()
        self._boundary = (0, 0)  # (epoch, batch_in_epoch) after the last optimizer step: where a rescue resumes
        self._final_saved = False
        # losses stay on the device until read in groups; the NaN guard skips on the device where it can
        # (library/train/readback.py)
        self._pending = PendingLosses()
        self._guard = NonFiniteGuard(session.optimizer, getattr(session.accelerator, "scaler", None) is not None,
                                     session.fused_backward)
        self._step_flag: torch.Tensor | None = None
        self._loss_log: TextIO | None = None  # --loss_log_file, written by _read_losses
        # the next batch loads while this one trains; not under caption token warm-up, whose captions depend on
        # the step a batch is loaded at (library/train/prefetch.py)
        self._prefetch: Prefetcher[Any] = Prefetcher(enabled=not any(
            item.subset.token_warmup_step > 0 for d in session.datasets for item in d.items))
        self._upcoming: PlannedBatch | None = None
        # --huggingface_repo_id: the main process uploads what it saves (library/train/hub_upload.py)
        target = HubTarget.from_config(session.cfg.hub)
        self._hub = HubUploader(target) if target and session.accelerator.is_main_process else None

    # --- one step -----------------------------------------------------------------------------------------------
    def _loss(self, batch: Any, micro: int, first_position: int) -> torch.Tensor:
        s, t = self.s, self.s.cfg.training
        gens = [step_generator(t.seed, self.state.global_step, micro, first_position + j)
                for j in range(len(batch.captions))]
        latents = batch_latents(s, batch, gens)
        text = batch_text(s, batch, grad=s.network.trains_text_encoder)
        seed = step_generator(t.seed, self.state.global_step, micro).initial_seed() % (2 ** 31)
        return compute_loss(s.family, s.models, t, batch, latents, text, generators=gens, seed=seed,
                            before_forward=s.network.before_forward, autocast=s.accelerator.autocast)

    def _load(self, pb: PlannedBatch, indices: list[int]) -> Any:
        ds = self.s.datasets[pb.dataset_index]
        self._use_multiplier(ds.config.network_multiplier)
        epoch, step = self.state.epoch, self.state.global_step
        batch = self._prefetch.get((epoch, pb.dataset_index, tuple(indices)),
                                   lambda: self._read_batch(pb, indices, epoch, step))
        self._prefetch_upcoming()
        return batch

    def _read_batch(self, pb: PlannedBatch, indices: list[int], epoch: int, step: int) -> Any:
        """Load a batch, its tensors pinned for a non-blocking copy to the GPU (safe on the prefetch thread)."""
        ds = self.s.datasets[pb.dataset_index]
        ds.set_progress(step, getattr(ds, "max_train_steps", None))
        return pin_tensors(ds.load_batch(indices, epoch))

    def _prefetch_upcoming(self) -> None:
        from library.train.data_setup import local_slice

        pb, self._upcoming = self._upcoming, None
        if pb is None or not self._prefetch.enabled:
            return
        acc = self.s.accelerator
        local = local_slice(pb.item_indices, acc.process_index, acc.num_processes)
        if local:
            epoch, step = self.state.epoch, self.state.global_step
            self._prefetch.ahead((epoch, pb.dataset_index, tuple(local)),
                                 lambda: self._read_batch(pb, local, epoch, step))

    def _use_multiplier(self, multiplier: float) -> None:
        """A dataset's network_multiplier (sd-scripts' dataset key) is the network's strength on its batches. Set
        on every batch once any dataset has one (sampling may have reset it); runs without one never touch it."""
        if multiplier == 1.0 and all(d.config.network_multiplier == 1.0 for d in self.s.datasets):
            return
        net = self.s.accelerator.unwrap_model(self.s.network.module)
        if hasattr(net, "set_multiplier"):
            net.set_multiplier(multiplier)

    def _micro_step(self, pb: PlannedBatch, micro: int) -> torch.Tensor:
        """This process's share of one global batch; returns the global mean loss (for logging)."""
        from library.train.data_setup import local_slice

        s, acc = self.s, self.s.accelerator
        world, rank = acc.num_processes, acc.process_index
        local = local_slice(pb.item_indices, rank, world)
        first = sum(len(local_slice(pb.item_indices, r, world)) for r in range(rank))
        total = len(pb.item_indices)
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        if local:
            loss = self._loss(self._load(pb, local), micro, first)
            if not self._guard.deferred and not loss_is_finite(loss):
                # never step on (or save) a NaN: the network would be corrupted silently
                raise UserError(f"the loss is {loss.item()} at step {self.state.global_step + 1} (epoch "
                                f"{self.state.epoch + 1}): training stopped before the optimizer step. Lower the "
                                "learning rate, use fp32/bf16 instead of fp16, or drop experimental low-VRAM flags; "
                                "resume from the last --save_state folder")
        else:  # fewer samples than processes: this one contributes zero gradient
            loss = sum(p.sum() for p in params) * 0.0
        # weight so that the average over processes is the mean over the global batch
        acc.backward(loss * (len(local) * world / total))
        if acc.sync_gradients:
            if world > 1:
                all_reduce_mean_(params)
            if self._guard.deferred:  # the step is skipped or undone on the device if the flag is set
                self._step_flag = self._guard.arm(loss if local else None, params)
            else:
                self._check_gradients()
            if s.cfg.optimizer.max_grad_norm:
                acc.clip_grad_norm_(params, s.cfg.optimizer.max_grad_norm)
        s.optimizer.step()
        self._guard.disarm()
        s.optimizer.zero_grad(set_to_none=True)
        logged = loss.detach().float() * len(local)
        if world > 1:
            logged = acc.reduce(logged, reduction="sum")
        return logged / total

    def _read_losses(self) -> None:
        """Read the pending steps' losses (one sync) and log them: progress bar, trackers, --loss_log_file. A step
        whose non-finite loss or gradient the optimizer skipped on the device stops the run here."""
        read = self._pending.read()
        if not read:
            return
        acc = self.s.accelerator
        skipped = [record for record, _, bad in read if bad]
        for record, value, bad in read:
            if bad:
                continue  # its optimizer step was skipped; the steps after it trained and are logged
            self.losses.append(value)
            acc.log({"loss/current": value, "lr/unet": record.lr}, step=record.step)
            if self._loss_log:
                self._loss_log.write(json.dumps({"step": record.step, "loss": value, "time": record.time}) + "\n")
        if self._loss_log:
            self._loss_log.flush()
        if self._bar is not None:
            last, value, _ = read[-1]
            self._bar.set_postfix(loss=f"{value:.4f}", lr=f"{last.lr:.2e}")
        if skipped:
            first = skipped[0]
            what = ("with --fused_backward_pass, the parameters whose gradient was not finite skipped that step and "
                    "the others stepped" if self.s.fused_backward is not None else "that optimizer step was skipped")
            raise UserError(f"the loss or the gradient is not finite at step {first.step} (epoch {first.epoch + 1}): "
                            f"{what}, and training stopped. Lower the learning rate, use bf16 instead of fp16, or "
                            "drop experimental low-VRAM flags; resume from the last --save_state folder")

    def _check_gradients(self) -> None:
        """A finite loss can still back-propagate NaN or inf (an overflow in one layer's backward): one optimizer
        step on such a gradient turns the whole network to NaN, silently. Stop before it, naming the parameters."""
        if getattr(self.s.accelerator, "scaler", None) is not None:
            return  # fp16 loss scaling: an inf gradient is expected now and then; the scaler skips that step
        bad = nonfinite_grads(list(self.s.network.module.named_parameters()))
        if bad:
            raise UserError(f"the gradient is not finite at step {self.state.global_step + 1} (epoch "
                            f"{self.state.epoch + 1}) in {', '.join(bad)}: training stopped before the optimizer "
                            "step. Lower the learning rate, use bf16 instead of fp16, or drop experimental low-VRAM "
                            "flags; resume from the last --save_state folder")

    # --- saving and sampling --------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str] | None:
        from library.train.metadata import save_metadata

        return save_metadata(self.s, self.state)  # --no_metadata: sd-scripts' minimum keys + the model card

    def save_network(self, file_name: str, folder: str | None = None, barrier: bool = True) -> str:
        """Write the network from the main process. `folder` defaults to --output_dir (a rescue may pick another);
        `barrier=False` skips the wait for the other processes, for a rescue after an error on one process."""
        s = self.s
        folder = folder or s.cfg.save.output_dir
        path = os.path.join(folder, file_name)
        if s.accelerator.is_main_process:
            os.makedirs(folder, exist_ok=True)
            dtype = SAVE_DTYPES.get(s.cfg.save.save_precision or "", None)
            set_schedule_free_mode(s.optimizer, train=False)  # a schedule-free run saves its averaged weights
            try:
                s.network.module.save_weights(path, dtype, self._metadata())
            finally:
                set_schedule_free_mode(s.optimizer, train=True)
        if barrier:
            s.accelerator.wait_for_everyone()
        return path

    def save_state(self, dir_name: str) -> None:
        # a schedule-free optimizer stays in train mode here: the folder holds the weights it steps on, so
        # --resume continues exactly
        ckpt.save_state(self.s, self.state, os.path.join(self.s.cfg.save.output_dir, dir_name))
        self._upload(dir_name, is_state=True)  # with --save_state_to_huggingface

    def _upload(self, path: str, is_state: bool = False, force_sync: bool = False) -> None:
        """--huggingface_repo_id: upload a saved network file (a state folder with --save_state_to_huggingface)."""
        if self._hub and (not is_state or self._hub.target.save_state):
            self._hub.upload(path if not is_state else os.path.join(self.s.cfg.save.output_dir, path), force_sync)

    def _remove_old(self, name: str | None, is_state: bool) -> None:
        """--save_last_n_*: delete the one save that left the window (library/train/retention.py)."""
        if name and self.s.accelerator.is_main_process:
            remove_path(os.path.join(self.s.cfg.save.output_dir, name))
        if is_state:
            self.s.accelerator.wait_for_everyone()

    def _sample_in_eval_mode(self) -> None:
        set_schedule_free_mode(self.s.optimizer, train=False)  # samples show the averaged weights
        try:
            self.sample()
        finally:
            set_schedule_free_mode(self.s.optimizer, train=True)

    def _every_n_epochs(self) -> int | None:
        sv, s = self.s.cfg.save, self.s
        steps_per_epoch = math.ceil(s.batches_per_epoch / s.cfg.training.gradient_accumulation_steps)
        return every_n_epochs_from_ratio(math.ceil(s.total_steps / steps_per_epoch), sv.save_n_epoch_ratio,
                                         sv.save_every_n_epochs)

    def _bar_says(self, what: str | None) -> None:
        """Show on the progress bar what the run is doing between steps (sampling can take minutes). Before it
        starts, the pending losses are read, so that the trackers get the steps in order."""
        if what is not None:
            self._prefetch.wait()  # sampling and validation may read the datasets too
            self._read_losses()
        if self._bar is not None:
            self._bar.set_description_str(what or "steps", refresh=True)

    def sample(self) -> None:
        if not self.s.cfg.sample.sample_prompts:
            return
        self._bar_says("sampling…")
        try:
            self._sample()
        finally:
            self._bar_says(None)

    def _sample(self) -> None:
        from library.train.sampling import sample_during_training

        s = self.s
        if s.sharded:  # the sharded model needs every process in each forward; the main one writes
            sample_during_training(s, self.state.global_step, write=s.accelerator.is_main_process)
        elif s.accelerator.is_main_process:
            sample_during_training(s, self.state.global_step)

    def validate(self) -> None:
        from library.train.validation import validation_loss

        self._bar_says("validation…")
        try:
            value = validation_loss(self.s)
        finally:
            self._bar_says(None)
        if value is None:
            return
        self.s.accelerator.print(f"step {self.state.global_step}: validation loss {value:.5f}")
        self.s.accelerator.log({"loss/validation": value}, step=self.state.global_step)

    def evaluate(self) -> None:
        from library.train.evaluation import TrainingEvaluator

        if not self.s.accelerator.is_main_process:
            return
        self._bar_says("evaluating…")
        try:
            if self._evaluator is None:
                self._evaluator = TrainingEvaluator(self.s)
            self._evaluator.evaluate(self.state.global_step)
        finally:
            self._bar_says(None)

    def _after_step(self) -> None:
        s, sv, sp = self.s, self.s.cfg.save, self.s.cfg.sample
        step = self.state.global_step
        if sv.save_every_n_steps and step % sv.save_every_n_steps == 0 and step < s.total_steps:
            self._upload(self.save_network(ckpt.step_file_name(sv.output_name, step)))
            old = step_to_remove(step, sv.save_every_n_steps, sv.save_last_n_steps)
            self._remove_old(old and ckpt.step_file_name(sv.output_name, old), False)
            if sv.save_state:
                self.save_state(f"{sv.output_name}-step{step:08d}-state")
                old = step_to_remove(step, sv.save_every_n_steps,
                                     state_window(sv.save_last_n_steps_state, sv.save_last_n_steps))
                self._remove_old(old and f"{sv.output_name}-step{old:08d}-state", True)
        if sp.sample_every_n_steps and step % sp.sample_every_n_steps == 0:
            self._sample_in_eval_mode()
        v = s.cfg.validation
        if v.validate_every_n_steps and step % v.validate_every_n_steps == 0:
            self.validate()
        if v.eval_every_n_steps and step % v.eval_every_n_steps == 0 and step < s.total_steps:
            self.evaluate()

    def _after_epoch(self, epoch_done: int) -> None:
        sv, sp = self.s.cfg.save, self.s.cfg.sample
        every = self._every_n_epochs()  # --save_every_n_epochs, or from --save_n_epoch_ratio
        if every and epoch_done % every == 0 and self.state.global_step < self.s.total_steps:
            self._upload(self.save_network(ckpt.epoch_file_name(sv.output_name, epoch_done)))
            old = epoch_to_remove(epoch_done, every, sv.save_last_n_epochs)
            self._remove_old(old and ckpt.epoch_file_name(sv.output_name, old), False)
            if sv.save_state:
                self.save_state(f"{sv.output_name}-{epoch_done:06d}-state")
                old = epoch_to_remove(epoch_done, every, state_window(sv.save_last_n_epochs_state,
                                                                      sv.save_last_n_epochs))
                self._remove_old(old and f"{sv.output_name}-{old:06d}-state", True)
        if sp.sample_every_n_epochs and epoch_done % sp.sample_every_n_epochs == 0:
            self._sample_in_eval_mode()
        v = self.s.cfg.validation
        if v.validate_every_n_epochs and epoch_done % v.validate_every_n_epochs == 0:
            self.validate()

    # --- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        s = self.s
        cfg = s.cfg
        acc = s.accelerator
        if cfg.save.resume:
            self.state = ckpt.load_state(s, cfg.save.resume)
            acc.print(f"resumed from {cfg.save.resume} at step {self.state.global_step}, epoch "
                      f"{self.state.epoch + 1}, batch {self.state.batch_in_epoch}")
        start = start_position(cfg.save.initial_epoch, cfg.save.initial_step, cfg.save.skip_until_initial_step,
                               math.ceil(s.batches_per_epoch / cfg.training.gradient_accumulation_steps),
                               cfg.training.gradient_accumulation_steps, s.total_steps)
        if start is not None:  # --initial_epoch / --initial_step win over a state's position, as in sd-scripts
            self.state.global_step, self.state.epoch = start.global_step, start.epoch
            self.state.batch_in_epoch = start.batch_in_epoch
        if acc.is_main_process and acc.log_with:
            init_trackers(acc, cfg)  # --log_tracker_name, --log_config, --log_tracker_config, --wandb_*
        per_device = max(d.batch_size for d in s.datasets) // acc.num_processes
        accum = cfg.training.gradient_accumulation_steps
        effective = per_device * acc.num_processes * accum
        acc.print(f"batches per epoch: {s.batches_per_epoch}, total optimization steps: {s.total_steps}, "
                  f"effective batch: {per_device} per device x {acc.num_processes} process(es) x "
                  f"{accum} accumulation = {effective}")
        acc.log({"config/effective_batch_size": effective}, step=self.state.global_step)
        if torch.cuda.is_available():
            acc.print(f"GPU memory with the models loaded: {torch.cuda.memory_allocated() / 2**20:.1f} MiB "
                      f"(peak so far {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB)")
        if cfg.sample.sample_at_first and self.state.global_step == 0:
            self.sample()
        bar = tqdm(total=s.total_steps, initial=self.state.global_step, disable=not acc.is_local_main_process,
                   desc="steps")
        loss_log = open(cfg.log.loss_log_file, "a", encoding="utf-8") if cfg.log.loss_log_file and acc.is_main_process else None
        self._bar = bar
        self._loss_log = loss_log
        self._stop.install()  # from here on SIGTERM stops at the next step boundary, after saving
        try:
            try:
                self._epochs(bar)
                self._read_losses()  # before the final save: a pending non-finite step stops the run here
            finally:
                try:
                    self._read_losses()  # an error is on its way: write what was pending, keep that error
                except Exception:  # noqa: BLE001
                    pass
                self._prefetch.close()
                bar.close()
                self._bar = None
                if loss_log:
                    loss_log.close()
            out = self._finish()
        except BaseException as error:  # any error, Ctrl-C or SIGTERM: save first, then report it
            replacement = self._stopped_early(error)
            if replacement is not None:
                raise replacement from None
            raise
        finally:
            self._stop.restore()
            if self._hub:
                self._hub.wait()  # --async_upload: the run ends when its uploads have (or have warned)
        acc.end_training()
        return TrainResult(out, self.state.global_step, self.losses)

    def _finish(self) -> str:
        """The final network, the final evaluation and the final state; returns the network's path."""
        cfg, acc = self.s.cfg, self.s.accelerator
        out = self.save_network(f"{cfg.save.output_name}.safetensors")
        self._final_saved = True
        self._upload(out, force_sync=True)  # the final network is on the Hub before the run ends, as in sd-scripts
        if torch.cuda.is_available():
            acc.print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
        if cfg.validation.evaluates and acc.is_main_process:
            self.evaluate()  # the final network, against the held-out images and the baseline
            written = self._evaluator.write(out) if self._evaluator else None
            if written:
                acc.print(f"wrote {written}")
        if cfg.save.save_state or cfg.save.save_state_on_train_end:
            self.save_state(f"{cfg.save.output_name}-state")
        return out

    def _stopped_early(self, error: BaseException) -> BaseException | None:
        """Save the network and the state as of the last optimizer step before the error is reported (see
        library/train/rescue.py); return the exception to raise instead of `error` (a SIGTERM's), or None."""
        s, acc, name = self.s, self.s.accelerator, self.s.cfg.save.output_name
        step = self.state.global_step
        terminated = isinstance(error, TrainingTerminated)
        why = "SIGTERM" if terminated else "Ctrl-C" if isinstance(error, KeyboardInterrupt) else type(error).__name__
        if step < 1 or self._final_saved:
            if terminated:
                return TrainingTerminated(f"stopped by SIGTERM at step {step}: "
                                          + ("the final network was saved" if self._final_saved else
                                             "no step was done, nothing to save"))
            if self._final_saved and acc.is_main_process:
                tell([f"the final network was saved to {s.cfg.save.output_dir} before this error"])
            return None
        # the optimizer has stepped `step` times; micro-batches accumulated since then are not in the weights
        self.state.epoch, self.state.batch_in_epoch = self._boundary
        collective = acc.num_processes == 1 or terminated  # a SIGTERM is agreed on by every process at one step
        if acc.is_main_process:
            tell([f"training stopped at step {step} ({why}): saving the network"
                  + (" and the training state" if collective else "") + " first"])
        folders = rescue_folders(s.cfg.save.output_dir, name)
        report = RescueReport()
        try:
            report = save_everything(folders, name, collective, acc.is_main_process,
                                     lambda folder, file, barrier: self.save_network(file, folder, barrier),
                                     self.save_state)
        finally:
            if acc.is_main_process:
                lines = report.lines(step)
                if not collective:
                    lines.append("the state was not saved: the error happened on one process, and saving the "
                                 "state needs all of them")
                tell(lines)
        if terminated:
            saved = report.state or report.weights
            return TrainingTerminated(f"stopped by SIGTERM at step {step}"
                                      + (f"; saved to {os.path.dirname(saved) or '.'}" if saved else
                                         "; nothing could be saved"))
        return None

    def _epochs(self, bar: tqdm) -> None:
        s, acc = self.s, self.s.accelerator
        accum = s.cfg.training.gradient_accumulation_steps
        self._boundary = (self.state.epoch, self.state.batch_in_epoch)
        at_boundary = True
        while self.state.global_step < s.total_steps:
            plan = plan_epoch(s.datasets, self.state.epoch, s.cfg.training.seed)
            s.network.on_epoch_start()
            for i in range(self.state.batch_in_epoch, len(plan)):
                if at_boundary and self._stop.agreed(acc):
                    raise TrainingTerminated("SIGTERM")  # _stopped_early saves and words the message
                self._upcoming = plan[i + 1] if i + 1 < len(plan) else None  # prefetched once batch i is in
                with acc.accumulate(s.network.module):
                    loss = self._micro_step(plan[i], i % accum)
                self.state.batch_in_epoch = i + 1
                at_boundary = acc.sync_gradients
                if not at_boundary:
                    continue
                s.scheduler.step()
                self.state.global_step += 1
                norms = s.network.after_optimizer_step(acc.device)  # --scale_weight_norms
                self._boundary = (self.state.epoch, self.state.batch_in_epoch)
                self._pending.add(StepRecord(self.state.global_step, self.state.epoch, loss.detach(),
                                             s.scheduler.get_last_lr()[0], time.time(), self._step_flag))
                self._step_flag = None
                bar.update(1)
                if norms or self._pending.due():
                    self._read_losses()
                if norms:
                    acc.log(norms, step=self.state.global_step)
                self._after_step()
                if self.state.global_step >= s.total_steps:
                    return
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            if at_boundary:
                self._boundary = (self.state.epoch, 0)
            self._after_epoch(self.state.epoch)


def train(cfg: RunConfig) -> TrainResult:
    try:
        return Trainer(build_session(cfg)).run()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # a clean exit: no abort or hang when the processes end
