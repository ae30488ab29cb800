"""TR-PTS and its baselines: the scoring pass (against finite differences), the budget allocation, sparse
tuning with frozen entries bit-identical after AdamW, the packed task file, class-attention token selection
(TR-PTS, EViT), sparse insertion and the score cache."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fpet import build_model
from fpet.checkpoint import load_task, save_task, task_storage_bytes
from fpet.merge import EViTSelect, TRPTSSelect, set_train_progress
from fpet.merge.token_select import evit_keep_rate
from fpet.pet import SparseTuned
from fpet.pet.pack import task_tensors
from fpet.pet.reparam import inference_model
from fpet.pet.sparse import selection_summary, sparse_layers
from fpet.profile import count_tokens_out
from fpet.select import (ScoringInput, block_weights, cached_scores, connection_budgets, critical_counts,
                         gradient_scores, row_selection)
from fpet.state import TokenState
from fpet.validate import ConfigError, validate_config
from fpet.vit import TokenViT

SCORING = ["pet.batches=1", "pet.batch_size=4"]


# --- scoring pass ------------------------------------------------------------------------------------------------

def tiny_model() -> TokenViT:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=8, depth=2, num_heads=2, num_classes=3,
                            mlp_ratio=2.0).double()
    return TokenViT(vit.requires_grad_(False)).eval()


def finite_difference(model, weight, entry, x, y, eps=1e-6) -> float:
    """d CE(model(x), y) / d weight[entry] by central differences (float64)."""
    with torch.no_grad():
        old = weight[entry].item()
        weight[entry] = old + eps
        up = F.cross_entropy(model(x), y).item()
        weight[entry] = old - eps
        down = F.cross_entropy(model(x), y).item()
        weight[entry] = old
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("kind,per_sample", [("fisher", False), ("fisher", True), ("gradient", False)])
def test_scores_equal_a_brute_force_computation(kind, per_sample):
    model = tiny_model()
    vit = model.vit
    weights = {"patch_embed.proj": vit.patch_embed.proj.weight, "blocks.1.attn.qkv": vit.blocks[1].attn.qkv.weight,
               "blocks.0.mlp.fc2": vit.blocks[0].mlp.fc2.weight}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])),
               (torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([1, 1, 0]))]
    scores = gradient_scores(model, weights, batches, kind=kind, per_sample=per_sample)
    for name, weight in weights.items():
        assert scores[name].shape == weight.shape and not weight.requires_grad
        for flat in torch.randperm(weight.numel(), generator=g)[:3].tolist():
            entry = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), weight.shape))
            units = [(x[i:i + 1], y[i:i + 1]) for x, y in batches for i in range(3)] if per_sample else batches
            grads = [finite_difference(model, weight, entry, x, y) for x, y in units]
            expected = sum(d * d for d in grads) / len(grads) if kind == "fisher" else abs(sum(grads))
            assert scores[name][entry].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_scoring_honours_the_batch_limit_and_restores_the_model():
    model = tiny_model().train()
    weight = model.vit.blocks[0].attn.proj.weight
    batch = (torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1]))
    one = gradient_scores(model, {"w": weight}, [batch], kind="fisher")
    limited = gradient_scores(model, {"w": weight}, [batch, (batch[0] * 3, batch[1])], kind="fisher", limit=1)
    assert torch.equal(one["w"], limited["w"])
    assert model.training and not weight.requires_grad


# --- allocation ---------------------------------------------------------------------------------------------------

def test_allocation_on_hand_made_scores_with_a_block_without_critical_entries():
    ones = lambda *shape: torch.ones(*shape)  # noqa: E731
    scores = {"patch_embed.proj": ones(2, 4) * 0.1,
              "blocks.0.attn.qkv": torch.tensor([[9.0, 8, 0, 0], [7, 0, 0, 0]]), "blocks.0.mlp.fc1": ones(2, 4) * 0,
              "blocks.1.attn.qkv": torch.tensor([[6.0, 0, 0, 0], [0, 0, 0, 0]]), "blocks.1.mlp.fc1": ones(2, 4) * 0,
              "blocks.2.attn.qkv": ones(2, 4) * 0.01, "blocks.2.mlp.fc1": ones(2, 4) * 0}
    # 56 entries, top 7.2% -> ceil(4.03) = 5 entries: 9, 8, 7 (block 0), 6 (block 1), one 0.1 (patch embedding)
    critical = critical_counts(scores, 7.2)
    assert critical == {"patch_embed.proj": 1, "blocks.0.attn.qkv": 3, "blocks.0.mlp.fc1": 0,
                        "blocks.1.attn.qkv": 1, "blocks.1.mlp.fc1": 0, "blocks.2.attn.qkv": 0, "blocks.2.mlp.fc1": 0}
    weights = block_weights(critical, scores)
    assert weights == {0: 3 / 16, 1: 1 / 16, 2: 0.0}
    # C_l = max(1, round(C_min * w_l / min_{w>0} w)): block 0 -> 3 * C_min, block 1 -> C_min, block 2 (w = 0) -> 1
    assert connection_budgets(weights, 1) == {0: 3, 1: 1, 2: 1}
    assert connection_budgets(weights, 2) == {0: 6, 1: 2, 2: 1}
    assert connection_budgets({0: 0.0, 1: 0.0}, 2) == {0: 2, 1: 2}
    assert connection_budgets({0: 0.25, 1: 0.1}, 1) == {0: 3, 1: 1}  # 2.5 rounds up


def test_critical_counts_do_not_depend_on_the_order_of_the_scores():
    # ties at the threshold (here every entry): a fresh pass (model order) and the cache (file order) must agree,
    # or a resumed run would rebuild other C_l than its checkpoint was trained with
    scores = {"patch_embed.proj": torch.zeros(2, 4), "blocks.0.mlp.fc1": torch.zeros(2, 4),
              "blocks.1.mlp.fc1": torch.zeros(2, 4)}
    reordered = {n: scores[n] for n in sorted(scores)}  # the order safetensors stores them in
    counts = critical_counts(scores, 25.0)
    assert counts == critical_counts(reordered, 25.0) and sum(counts.values()) == 6
    assert list(critical_counts(reordered, 25.0)) == list(reordered)


def test_row_selection_keeps_each_rows_top_entries():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0]])
    assert row_selection(score, 2).tolist() == [[1, 2], [0, 2]]
    assert row_selection(score, 9).shape == (2, 4)  # capped at the row length
    conv = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)  # a conv weight is scored row-flattened
    assert row_selection(conv, 1).tolist() == [[11], [11]]


# --- sparse tuning ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trpts_model(tmp_path_factory):
    from fpet.config import compose_config
    from conftest import FAST

    out = tmp_path_factory.mktemp("trpts")
    cfg = compose_config([*FAST, f"paths.output_dir={out}", "pet=trpts", *SCORING])
    return cfg, build_model(cfg, ScoringInput(cache=out / "fisher.safetensors")), out


def test_trained_set_is_the_selection_biases_and_head(trpts_model):
    _, model, _ = trpts_model
    layers = sparse_layers(model.vit)
    assert len(layers) == 1 + 4 * len(model.vit.blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"vit.head.weight", "vit.head.bias"} | {f"vit.{n}.entries" for n in layers} | {
        f"vit.{n}.base_layer.bias" for n in layers}
    assert trainable == expected
    summary = selection_summary(model)
    connections = summary["connections"]
    assert connections["patch_embed"] == 1 and min(connections.values()) >= 1
    for name, layer in layers.items():  # every row of a block's matrices trains the block's C_l connections
        block = name.split(".")[1] if name.startswith("blocks.") else "patch_embed"
        assert layer.entries.shape == (layer.base_layer.weight.shape[0], connections[block])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_sparse_linear_has_the_scattered_weights_gradients_and_saves_no_weight_copy(dtype):
    from fpet.pet.sparse import sparse_linear
    from fpet.profile import saved_for_backward_bytes

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    index = row_selection(torch.rand(5, 6), 2)
    entries = torch.nn.Parameter(torch.randn(5, 2))
    x = torch.randn(3, 4, 6, requires_grad=True)
    outs = {}
    for mode in ("scatter", "sparse"):
        leaves = [x, base.weight, base.bias, entries]
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if mode == "scatter":
                y = F.linear(x, base.weight.flatten(1).scatter(1, index, entries), base.bias)
            else:
                y = sparse_linear(x, base.weight, base.bias, index, entries)
        (y.float() * torch.arange(5.0)).sum().backward()
        outs[mode] = [y.detach()] + [t.grad.clone() for t in leaves]
    tol = {} if dtype is None else {"atol": 0.05, "rtol": 0.02}
    for ref, got in zip(outs["scatter"], outs["sparse"]):
        torch.testing.assert_close(got, ref, **tol)
    assert (outs["sparse"][2].flatten(1).gather(1, index) == 0).all()  # replaced entries: no base-weight gradient
    layer = SparseTuned(torch.nn.Linear(6, 5))
    layer.select(index)
    assert saved_for_backward_bytes(layer, lambda: layer(x).sum()) == x.numel() * 4  # only the input


def test_frozen_entries_stay_bit_identical_after_adamw_with_weight_decay(trpts_model, images):
    cfg, built, _ = trpts_model
    import copy
    model = copy.deepcopy(built).train()
    pretrained = {n: layer.base_layer.weight.detach().clone() for n, layer in sparse_layers(model.vit).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
        optimizer.step()
    folded, report = inference_model(model.eval())
    assert report.reparameterized and not sparse_layers(folded)
    for name, layer in sparse_layers(model.vit).items():
        assert torch.equal(layer.base_layer.weight, pretrained[name])  # the original weight is never written
        final = folded.vit.get_submodule(name).weight.detach().flatten(1)
        selected = torch.zeros_like(final, dtype=torch.bool).scatter(1, layer.index, True)
        assert torch.equal(final[~selected], pretrained[name].flatten(1)[~selected])
        assert not torch.equal(final[selected], pretrained[name].flatten(1)[selected])
    assert torch.allclose(folded(images), model(images), atol=1e-5)


def test_task_file_holds_the_packed_selection_and_loads_by_adopting_it(trpts_model, tmp_path):
    cfg, model, _ = trpts_model
    with torch.no_grad():
        for layer in sparse_layers(model.vit).values():
            layer.entries.add_(0.25)
    path = tmp_path / "task.safetensors"
    size = save_task(model, path)
    layers = sparse_layers(model.vit)
    entries = sum(layer.selected_count for layer in layers.values())
    biases = sum(layer.base_layer.bias.numel() for layer in layers.values())
    payload = entries * (4 + 2) + 8 * len(layers) + 4 * (biases + model.vit.head.weight.numel() + 6)
    tensors = task_tensors(model)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == payload  # fp32 values, int16 columns
    assert payload < size < payload + 200 * len(tensors)  # + the safetensors header
    assert not any(name.endswith("base_layer.weight") for name in tensors)
    assert size == task_storage_bytes(model)
    fresh = build_model(cfg, ScoringInput(task_file=path))  # no scoring: the file's selection is adopted
    load_task(fresh, path)
    for name, layer in sparse_layers(fresh.vit).items():
        assert torch.equal(layer.index, layers[name].index)
        assert torch.equal(layer.entries, layers[name].entries)  # (random init: the frozen rest differs here)
        assert torch.equal(layer.base_layer.bias, layers[name].base_layer.bias)


def test_a_resumed_run_reuses_the_cached_scores(trpts_model, monkeypatch):
    cfg, model, out = trpts_model

    def no_scoring(*args, **kwargs):
        raise AssertionError("scores were computed again")

    monkeypatch.setattr("fpet.pet.sparse.gradient_scores", no_scoring)
    again = build_model(cfg, ScoringInput(cache=out / "fisher.safetensors"))
    for name, layer in sparse_layers(again.vit).items():
        assert torch.equal(layer.index, sparse_layers(model.vit)[name].index)
    assert (out / "selection.json").is_file()
    calls = []
    cached_scores(lambda: calls.append(1) or {"w": torch.ones(1)}, out / "fisher.safetensors", {"other": 1})
    assert calls == [1]  # scored with other settings: computed again


def test_gps_takes_a_fixed_count_per_row(make_cfg):
    model = build_model(make_cfg("pet=gps", "pet.c_min=2", *SCORING))
    assert {layer.entries.shape[1] for layer in sparse_layers(model.vit).values()} == {2}
    assert isinstance(model.vit.blocks[0].mlp.fc1, SparseTuned)


# --- token selection ----------------------------------------------------------------------------------------------

def hand_state(prefix: int = 2) -> TokenState:
    B, P, C, H = 2, 10, 4, 3
    x = torch.randn(B, prefix + P, C, generator=torch.Generator().manual_seed(0))
    attn = torch.rand(B, H, prefix + P, generator=torch.Generator().manual_seed(1)).softmax(-1)
    size = torch.randint(1, 4, (B, prefix + P, 1)).float()
    size[:, :prefix] = 1
    return TokenState(x, num_prefix=prefix, grid=(2, 5), size=size, cls_attn=attn)


@pytest.mark.parametrize("strategy", ["trpts", "evit"])
def test_selection_keeps_the_top_tokens_in_order_and_fuses_the_rest(strategy):
    state = hand_state()
    n = state.num_prefix
    merge = TRPTSSelect(0.75) if strategy == "trpts" else EViTSelect(0.75, 0, 0, prop_attn=True)
    out = merge(state)
    k = 7 if strategy == "trpts" else 8  # floor(0.75 * 10) vs ceil(0.75 * 10)
    assert out.x.shape == (2, n + k + 1, 4) and out.num_prefix == n
    scores = state.cls_attn.mean(1)[:, n:]
    for b in range(2):
        top = sorted(scores[b].topk(k).indices.tolist())
        rest = sorted(set(range(10)) - set(top))
        assert torch.equal(out.x[b, :n], state.x[b, :n])  # prefix untouched and first
        assert torch.equal(out.x[b, n:n + k], state.x[b, n:][top])
        a = scores[b, rest][:, None]
        fused = (a * state.x[b, n:][rest]).sum(0)
        if strategy == "trpts":
            fused = fused / a.sum()
        assert torch.allclose(out.x[b, -1], fused, atol=1e-6)
        assert out.size[b, -1, 0] == state.size[b, n:][rest].sum()
    assert torch.equal(out.size.sum(1), state.size.sum(1))  # sizes conserved
    assert out.cls_attn is None


def test_evit_without_proportional_attention_keeps_no_sizes():
    state = hand_state(prefix=1)
    state.size = None
    out = EViTSelect(0.7, 0, 0, prop_attn=False)(state)
    assert out.size is None and out.x.shape[1] == 1 + 7 + 1


@pytest.mark.parametrize("merge,tokens", [("evit", (140, 100, 72)), ("trpts", (188, 179, 171))])
def test_token_counts_at_blocks_3_6_9(make_cfg, merge, tokens):
    # EViT rho 0.7: 196 -> 138 + 1 -> 98 + 1 -> 70 + 1 patches; TR-PTS rho 0.95: 186 + 1 -> 177 + 1 -> 169 + 1
    model = build_model(make_cfg("pet=lora", f"merge={merge}", "merge.layer=[3,6,9]")).eval()
    assert sorted(int(k) for k in model.merges) == [3, 6, 9]
    with torch.no_grad():
        trace = model.forward_tokens(torch.rand(2, 3, 224, 224)).trace
    mlp_tokens = [int(n_mlp) for _, n_mlp in trace]  # tokens entering each block's MLP
    assert mlp_tokens == [197] * 3 + [tokens[0]] * 3 + [tokens[1]] * 3 + [tokens[2]] * 3
    assert count_tokens_out(model, 224) == tokens[-1]


def test_evit_keep_rate_warm_up():
    assert evit_keep_rate(5, 0, 1, 3, 10, 0.7) == 1.0  # before the warm-up starts
    assert evit_keep_rate(30, 3, 1, 3, 10, 0.7) == 0.7  # from the last epoch on
    assert evit_keep_rate(20, 2, 1, 3, 10, 0.7) == pytest.approx(0.85)  # half-way: cosine midpoint
    merge = EViTSelect(0.7, 1, 3, prop_attn=False)
    model = torch.nn.ModuleDict({"m": merge})
    set_train_progress(model, epoch=0, step=4, steps_per_epoch=10)
    assert merge.train().keep_rate() == 1.0 and merge.eval().keep_rate() == 0.7
    set_train_progress(model, epoch=2, step=0, steps_per_epoch=10)
    assert merge.train().keep_rate() == pytest.approx(0.85)


# --- sparse insertion ---------------------------------------------------------------------------------------------

def test_sparse_insertion_sits_at_the_blocks_with_the_fewest_selected_weights(make_cfg):
    model = build_model(make_cfg("pet=trpts", "merge=trpts", *SCORING))
    summary = selection_summary(model)
    assert sorted(int(k) for k in model.merges) == sorted(summary["sparse_order"][:3])
    counts = {i: sum(m.selected_count for m in b.modules() if isinstance(m, SparseTuned))
              for i, b in enumerate(model.vit.blocks)}
    chosen = [counts[int(k)] for k in model.merges]
    others = [c for i, c in counts.items() if str(i) not in model.merges]
    assert max(chosen) <= min(others)


def test_sparse_insertion_without_a_selecting_pet_method_is_a_clear_config_error(make_cfg):
    with pytest.raises(ConfigError, match="pet=trpts or pet=gps"):
        validate_config(make_cfg("pet=lora", "merge=trpts"), check_files=False)
    validate_config(make_cfg("pet=lora", "merge=trpts", "merge.layer=[2,5]"), check_files=False)
    with pytest.raises(ConfigError, match="merge.keep"):
        validate_config(make_cfg("pet=trpts", "merge=trpts", "merge.keep=1.5"), check_files=False)
    with pytest.raises(ConfigError, match="pet.score"):
        validate_config(make_cfg("pet=trpts", "pet.score=hessian"), check_files=False)


# --- runs: resume and reloading a task file -------------------------------------------------------------------------

NO_BENCH = ["bench.flops=false", "bench.latency=false", "bench.train=false"]


def refuse_scoring(monkeypatch) -> None:
    def no_scoring(*args, **kwargs):
        raise AssertionError("scores were computed again")

    monkeypatch.setattr("fpet.pet.sparse.gradient_scores", no_scoring)


def test_a_resumed_training_run_reads_the_scores_of_its_run_dir(make_cfg, tmp_path, monkeypatch):
    from fpet.train import run

    cfg = make_cfg("pet=trpts", "merge=trpts", "train.keep_last_ckpt=true", *SCORING, *NO_BENCH)
    run(cfg, tmp_path)
    first = (tmp_path / "selection.json").read_text()
    assert (tmp_path / "fisher.safetensors").is_file() and (tmp_path / "last.ckpt").is_file()
    (tmp_path / "results.json").unlink()  # as if killed after the last checkpoint: the next run resumes
    refuse_scoring(monkeypatch)
    resumed = run(cfg, tmp_path)
    assert resumed["resumed_from_epoch"] == 1  # the checkpoint's entries fit the selection rebuilt from the cache
    assert (tmp_path / "selection.json").read_text() == first


def test_visualize_adopts_the_task_files_selection_without_scoring(trpts_model, tmp_path, monkeypatch):
    from fpet.visualize import trained_model

    cfg, model, _ = trpts_model
    path = tmp_path / "task.safetensors"
    save_task(model, path)
    refuse_scoring(monkeypatch)  # a task file holds its selection: no data, no scoring pass
    loaded, _ = trained_model(["backbone=vit_micro", "pet=trpts", *SCORING], path)
    for name, layer in sparse_layers(loaded.vit).items():
        assert torch.equal(layer.index, sparse_layers(model.vit)[name].index)
        assert torch.equal(layer.entries, sparse_layers(model.vit)[name].entries)


def test_export_adopts_the_task_files_selection_without_scoring(tmp_path, monkeypatch):
    from conftest import FAST
    from fpet import export
    from fpet.pipeline import session_from_overrides

    overrides = [*FAST, "pet=trpts", *SCORING]
    model = session_from_overrides(overrides).model.eval()  # seeded as a run: export rebuilds the same backbone
    path = tmp_path / "task.safetensors"
    save_task(model, path)
    refuse_scoring(monkeypatch)  # exporting a run reads no training data
    deploy, _ = export.inference_model(export.resolve_source(str(path), overrides))
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deploy(images), model(images), atol=1e-5, rtol=1e-5)
