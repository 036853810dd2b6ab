"""Subject-fidelity evaluation during training: sample the prompts with fixed seeds, score them against the held-out
images (DINO, CLIP-I, CLIP-T), log the numbers, and write eval.json beside the network at the end, with the base
model (multiplier 0, same prompts and seeds) as the baseline computed once."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from library.eval.report import compare_reports, evaluate_folders, write_report_json

if TYPE_CHECKING:
    from library.train.session import Session


class TrainingEvaluator:
    def __init__(self, session: Session):
        from library.eval.metrics import load_clip_model, load_dino_model

        self.s = session
        v = session.cfg.validation
        self.root = os.path.join(session.cfg.save.output_dir, "eval")
        self.real_dir = self._collect_heldout()
        device = str(session.accelerator.device)
        self.dino = load_dino_model(v.eval_dino_model, device=device) if v.eval_dino_model else None
        self.clip = load_clip_model(v.eval_clip_model, device=device) if v.eval_clip_model else None
        if self.dino is None and self.clip is None:
            print("evaluation: DINO and CLIP skipped: no --eval_dino_model / --eval_clip_model given")
        self.baseline: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    def _collect_heldout(self) -> str | None:
        """The held-out images, gathered in one folder (the metric compares folders)."""
        paths = [it.record.path for ds in self.s.datasets for it in ds.validation_items]
        if not paths:
            print("evaluation: no held-out images (set validation_split in the dataset config); metrics skipped")
            return None
        real = os.path.join(self.root, "heldout")
        os.makedirs(real, exist_ok=True)
        for i, p in enumerate(paths):
            dst = os.path.join(real, f"{i:04d}_{os.path.basename(p)}")
            if not os.path.exists(dst):
                shutil.copyfile(p, dst)
        return real

    def _score(self, multiplier: float | None, name: str, step: int) -> dict[str, Any] | None:
        from library.train.sampling import sample_during_training

        if self.real_dir is None or not self.s.cfg.sample.sample_prompts:
            return None
        out = os.path.join(self.root, name)
        shutil.rmtree(out, ignore_errors=True)
        # the LoRA's images go to TensorBoard as the sample grid of this step; the baseline's do not
        sample_during_training(self.s, step, out_dir=out, multiplier=multiplier, log_images=multiplier is None)
        return evaluate_folders(out, self.real_dir, self.dino, self.clip,
                                rare_token=self.s.cfg.validation.eval_rare_token)

    def evaluate(self, step: int) -> dict[str, Any] | None:
        if self.baseline is None:
            self.baseline = self._score(0.0, "baseline", step)
        report = self._score(None, f"step{step:08d}", step)
        if report is None:
            return None
        self.last = {"step": step, "lora": report, "baseline": self.baseline,
                     "gain": compare_reports(report, self.baseline) if self.baseline else None}
        logs = {f"eval/{k}": report[k] for k in ("dino", "clip_i", "clip_t") if report.get(k) is not None}
        if self.last["gain"]:
            logs.update({f"eval/gain_{k}": v for k, v in self.last["gain"].items() if v is not None})
        self.s.accelerator.log(logs, step=step)
        return self.last

    def write(self, network_file: str) -> str | None:
        if self.last is None:
            return None
        path = os.path.join(os.path.dirname(network_file), "eval.json")
        write_report_json(self.last, path)
        return path
