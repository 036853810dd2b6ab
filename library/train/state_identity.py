"""What a training state depends on, and a clear refusal when --resume meets a run that differs.

A state folder holds the network's weights, the optimizer's moments and a position in the epoch's batch order. Each
only means something for the run that wrote it: another rank or module list does not fit the weights, another
optimizer does not fit the moments, and another dataset, seed, batch size or process count changes the batch order,
so "continue at batch 7 of epoch 2" would silently skip or repeat images. `describe_run` records the few facts each
part depends on (cheap: shapes, counts and a hash of the dataset's item list, no pixels); `differences` compares
them with the current run in the user's terms ("--network_dim 8 then, 16 now").
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# network flags that decide the network's parameters, as the user types them
_NETWORK_FLAGS = ("network_module", "network_dim", "network_alpha", "network_args", "cond_emb_dim",
                  "network_train_unet_only", "network_train_text_encoder_only")


def network_shapes(module: Any) -> dict[str, list[int]]:
    """Every entry of the network's state dict with its shape: what its saved weights must fit."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _item_key(item: Any) -> list[Any]:
    """One training image as the batch order sees it. The path is taken relative to its subset's folder, so that
    moving the whole dataset folder keeps the fingerprint."""
    path = item.record.path
    root = getattr(item.subset, "image_dir", None)
    if root:
        path = os.path.relpath(path, root)
    return [item.record.subset_index, path.replace(os.sep, "/"), list(item.original_size), list(item.bucket),
            item.num_repeats]


def dataset_summary(dataset: Any) -> dict[str, Any]:
    """Counts for the message, and a hash of the ordered item list (path, size, bucket, repeats) for the check."""
    items = [dataset.items[i] for i in dataset.train_indices]
    keys = [_item_key(item) for item in items]
    digest = hashlib.sha256(json.dumps([dataset.batch_size, keys]).encode("utf-8")).hexdigest()
    return {"table": dataset.config.table, "batch_size": dataset.batch_size, "images": len(items),
            "samples_per_epoch": len(dataset),
            "buckets": {f"{w}x{h}": n for (w, h), n in dataset.bucket_histogram().items()},
            "fingerprint": digest}


def _qualified(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _plain(value: Any) -> Any:
    """A flag value as JSON keeps it (tuples as lists), so that a value compares equal after the round trip."""
    return list(value) if isinstance(value, (list, tuple)) else value


def describe_run(session: Any) -> dict[str, Any]:
    """The facts about the current run that a state saved from it depends on."""
    cfg = session.cfg
    groups = session.optimizer.param_groups
    inner = getattr(session.optimizer, "optimizer", session.optimizer)  # accelerate wraps it
    return {
        "num_processes": session.accelerator.num_processes,
        "seed": cfg.training.seed,
        "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "network": {"kind": cfg.network_kind,
                    "flags": {k: _plain(getattr(cfg.network, k, None)) for k in _NETWORK_FLAGS},
                    "shapes": network_shapes(session.network.module)},
        "optimizer": {"type": cfg.optimizer.optimizer_type or type(inner).__name__, "class": _qualified(inner),
                      "group_sizes": [len(g["params"]) for g in groups],
                      "optimizer_args": list(cfg.optimizer.optimizer_args or []),
                      "learning_rate": cfg.optimizer.learning_rate},
        "datasets": [dataset_summary(d) for d in session.datasets],
        "batches_per_epoch": session.batches_per_epoch,
    }


def _flag(name: str, then: Any, now: Any) -> str:
    return f"--{name} {_show(then)} then, {_show(now)} now"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[] (none)"
    return "(not set)" if value is None else str(value)


def _network_differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    flags_then, flags_now = then.get("flags", {}), now["flags"]
    if then.get("kind") != now["kind"]:
        out.append(f"the network kind: {then.get('kind')} then, {now['kind']} now")
    changed = [_flag(k, flags_then.get(k), flags_now[k]) for k in _NETWORK_FLAGS
               if k in flags_then and flags_then[k] != flags_now[k] and k != "network_alpha"]
    shapes_then, shapes_now = then.get("shapes", {}), now["shapes"]
    if shapes_then != shapes_now:
        if changed:
            out += changed
        else:
            gone = [k for k in shapes_then if k not in shapes_now]
            new = [k for k in shapes_now if k not in shapes_then]
            resized = [k for k in shapes_now if k in shapes_then and shapes_then[k] != shapes_now[k]]
            detail = [f"{len(gone)} tensors gone (e.g. {gone[0]})"] if gone else []
            detail += [f"{len(new)} new (e.g. {new[0]})"] if new else []
            detail += [f"{len(resized)} resized (e.g. {resized[0]}: {shapes_then[resized[0]]} then, "
                       f"{shapes_now[resized[0]]} now)"] if resized else []
            out.append("the network's parameters: " + ", ".join(detail))
    if flags_then.get("network_alpha") != flags_now["network_alpha"]:
        out.append(_flag("network_alpha", flags_then.get("network_alpha"), flags_now["network_alpha"]))
    return out


def _dataset_differences(then: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    if len(then) != len(now):
        return [f"the dataset changed: {len(then)} [[datasets]] tables then, {len(now)} now"]
    out = []
    for a, b in zip(then, now):
        if a.get("fingerprint") == b["fingerprint"]:
            continue
        changes = [f"{key.replace('_', ' ')} {a.get(key)} then, {b[key]} now"
                   for key in ("batch_size", "images", "samples_per_epoch") if a.get(key) != b[key]]
        if not changes and a.get("buckets") != b["buckets"]:
            changes.append(f"buckets {a.get('buckets')} then, {b['buckets']} now")
        if not changes:
            changes.append("the same counts, but other images, image sizes or repeats")
        out.append(f"the dataset changed: {b['table']}: " + "; ".join(changes))
    return out


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What keeps a state saved under `then` from continuing the run `now`, one line each (empty: it fits)."""
    out = []
    if then.get("num_processes") != now["num_processes"]:
        out.append(f"saved with {then.get('num_processes')} process(es), now running with {now['num_processes']}; "
                   "resume with the same number of processes")
    for key in ("seed", "gradient_accumulation_steps"):
        if then.get(key) != now[key]:
            out.append(_flag(key, then.get(key), now[key]) + " (the batch order and step count depend on it)")
    out += _network_differences(then.get("network", {}), now["network"])
    opt_then, opt_now = then.get("optimizer", {}), now["optimizer"]
    if opt_then.get("class") != opt_now["class"]:
        out.append(f"optimizer {opt_then.get('type')} then, {opt_now['type']} now")
    elif opt_then.get("group_sizes") != opt_now["group_sizes"]:
        out.append(f"the optimizer's parameter groups: {opt_then.get('group_sizes')} parameters then, "
                   f"{opt_now['group_sizes']} now (--unet_lr / --text_encoder_lr or what the network trains changed)")
    out += _dataset_differences(then.get("datasets", []), now["datasets"])
    return out


def ignored_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Changes a resume accepts but does not apply: the optimizer's hyperparameters (its param groups) and the
    schedule's base rates come back from the state."""
    opt_then, opt_now = then.get("optimizer", {}), now["optimizer"]
    return [_flag(k, opt_then.get(k), opt_now[k]) for k in ("learning_rate", "optimizer_args")
            if k in opt_then and opt_then[k] != opt_now[k]]
