import math

import pytest
import torch
import torch.nn.functional as F

from pcl_scale.core.clusters import Clustering, ClusterResult, cluster_features
from pcl_scale.core.kmeans import KMeansOptions
from pcl_scale.core.loss import PCLLoss, infonce_logits, protonce_logits
from pcl_scale.core.model import BackboneSpec, PCLModel


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_logits_against_loop():
    q, k, queue = unit(4, 8, seed=0), unit(4, 8, seed=1), unit(6, 8, seed=2)
    logits = infonce_logits(q, k, queue, 0.2)
    assert logits.shape == (4, 7)
    for i in range(4):
        assert logits[i, 0].item() == pytest.approx(float(q[i] @ k[i]) / 0.2, rel=1e-5, abs=1e-6)
        for j in range(6):
            assert logits[i, 1 + j].item() == pytest.approx(
                float(q[i] @ queue[j]) / 0.2, rel=1e-5, abs=1e-6
            )


def test_protonce_logits_against_loop():
    q, scaled = unit(3, 8, seed=0), unit(10, 8, seed=1) * 4
    ids = torch.tensor([[4, 4, 9, 0, 2], [7, 8, 7, 1, 3]])  # (M, B + r): 3 positives, r = 2
    logits = protonce_logits(q, scaled, ids)
    assert logits.shape == (3, 2, 5)
    for i in range(3):
        for m in range(2):
            for j, c in enumerate(ids[m].tolist()):
                expected = float(q[i] @ scaled[c])
                assert logits[i, m, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_table_rows_are_prototypes_over_phi_with_offsets():
    feats = unit(60, 8, seed=0)
    clusters = cluster_features(feats, (7, 12, 5), 0.2, KMeansOptions(niter=3))
    table = clusters.table
    assert table.scaled.shape == (24, 8)
    assert table.offsets.flatten().tolist() == [0, 7, 19]
    for m, c in enumerate(clusters.clusterings):
        for j in range(c.num_prototypes):
            row = table.scaled[int(table.offsets[m]) + j]
            torch.testing.assert_close(row, c.prototypes[j] / c.phi[j])
    assert clusters.table is table  # built once per result


def test_protonce_with_instance_prototypes_and_phi_tau_is_infonce():
    """Prototypes = [k_i, queue], phi = T: for each sample ProtoNCE equals InfoNCE."""
    tau, r = 0.2, 16
    q, k, queue = unit(5, 8, seed=0), unit(5, 8, seed=1), unit(r, 8, seed=2)
    for i in range(5):
        protos = torch.cat([k[i : i + 1], queue])  # id 0 = the key, ids 1..r = the queue
        clusters = ClusterResult(
            (Clustering(protos, torch.full((r + 1,), tau), torch.zeros(1, dtype=torch.long)),)
        )
        g = torch.Generator().manual_seed(i)
        out = PCLLoss(tau, r)(
            q[i : i + 1],
            k[i : i + 1],
            queue,
            torch.zeros(1, dtype=torch.long),
            clusters,
            generator=g,
        )
        assert out.loss_proto is not None
        torch.testing.assert_close(out.loss_proto, out.loss_inst)


def test_total_loss_is_inst_plus_mean_proto():
    tau, r = 0.2, 3
    n, b = 50, 6
    feats = unit(n, 8, seed=0)
    clusters = cluster_features(feats, (10, 20), tau, KMeansOptions(niter=5))
    q, k, queue = unit(b, 8, seed=1), unit(b, 8, seed=2), unit(12, 8, seed=3)
    index = torch.tensor([0, 5, 7, 11, 30, 49])
    out = PCLLoss(tau, r)(q, k, queue, index, clusters, generator=torch.Generator().manual_seed(0))
    # slow reference with the same draws: the r eligible ids with the smallest seeded keys
    keys = torch.rand(2, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    protos, accs = [], []
    for m, c in enumerate(clusters.clusterings):
        pos = c.assignments[index].tolist()
        eligible = [j for j in range(c.num_prototypes) if j not in pos]
        neg = sorted(eligible, key=lambda j: float(keys[m, j]))[:r]
        total, hits = 0.0, 0
        for i in range(b):
            logits = torch.stack([q[i] @ c.prototypes[j] / c.phi[j] for j in pos + neg])
            total += -float(torch.log_softmax(logits, 0)[i])
            hits += int(logits.argmax()) == i
        protos.append(total / b)
        accs.append(100.0 * hits / b)
    inst = (
        sum(
            -float(torch.log_softmax(torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / tau, 0)[0])
            for i in range(b)
        )
        / b
    )
    assert out.loss_inst.item() == pytest.approx(inst, rel=1e-5, abs=1e-6)
    assert out.loss_proto is not None and out.acc_proto is not None
    assert out.loss_proto.item() == pytest.approx(sum(protos) / 2, rel=1e-5, abs=1e-6)
    assert out.acc_proto.item() == pytest.approx(sum(accs) / 2, abs=1e-4)
    assert out.loss.item() == pytest.approx(inst + sum(protos) / 2, rel=1e-5, abs=1e-6)


def test_float32_logits_under_bf16_autocast():
    """The loss ignores autocast: the same value and gradient as without it."""
    feats = unit(80, 16, seed=0)
    clusters = cluster_features(feats, (14, 20), 0.2, KMeansOptions(niter=3))
    k, queue, index = unit(8, 16, seed=2), unit(64, 16, seed=3), torch.arange(8) * 9
    losses, grads = [], []
    for autocast in (False, True):
        q = unit(8, 16, seed=1).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = PCLLoss(0.2, 4)(
                q, k, queue, index, clusters, generator=torch.Generator().manual_seed(0)
            )
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        losses.append(out.loss.detach())
        grads.append(q.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_warmup_is_infonce_only():
    q, k, queue = unit(4, 8, seed=0), unit(4, 8, seed=1), unit(6, 8, seed=2)
    out = PCLLoss(0.2, 2)(q, k, queue, torch.arange(4), None, generator=torch.Generator())
    assert out.loss_proto is None and out.acc_proto is None
    torch.testing.assert_close(out.loss, out.loss_inst)


def test_invariant_to_prototype_permutation():
    tau, k_protos, b = 0.2, 30, 8
    protos = unit(k_protos, 8, seed=0)
    phi = torch.rand(k_protos, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.05
    assignments = torch.randint(k_protos, (40,), generator=torch.Generator().manual_seed(2))
    index = torch.arange(b) * 3
    # distinct positives, so that r = K - B draws every eligible prototype whatever the order
    assignments[index] = torch.randperm(k_protos, generator=torch.Generator().manual_seed(7))[:b]
    perm = torch.randperm(k_protos, generator=torch.Generator().manual_seed(3))  # new id of old
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(k_protos)
    permuted = Clustering(protos[inv], phi[inv], perm[assignments])
    q, k, queue = unit(b, 8, seed=4), unit(b, 8, seed=5), unit(10, 8, seed=6)
    r = k_protos - int(assignments[index].unique().numel())  # all eligible: same negative set
    assert r == k_protos - b
    a = PCLLoss(tau, r)(
        q,
        k,
        queue,
        index,
        ClusterResult((Clustering(protos, phi, assignments),)),
        generator=torch.Generator().manual_seed(0),
    )
    c = PCLLoss(tau, r)(
        q, k, queue, index, ClusterResult((permuted,)), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a.loss, c.loss)


def test_gradients_reach_only_the_online_encoder():
    model = PCLModel(BackboneSpec("resnet18", small_stem=True), dim=16, queue_size=32)
    x = torch.randn(4, 3, 16, 16)
    q, k = model(x, x.flip(3))
    assert k is not None and not k.requires_grad
    feats = unit(20, 16, seed=0)
    clusters = cluster_features(feats, (6,), 0.2, KMeansOptions(niter=3))
    out = PCLLoss(0.2, 2)(
        q, k, model.queue, torch.arange(4), clusters, generator=torch.Generator().manual_seed(0)
    )
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    grads = [p.grad for p in model.encoder_q.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert not model.queue.requires_grad
    assert math.isfinite(out.loss.item())


def test_assignments_stay_in_host_memory_as_int32():
    """Only the K-sized prototypes and phi move to a device; positives are looked up on the host."""
    clusters = cluster_features(unit(60, 8, seed=0), (7, 12), 0.2, KMeansOptions(niter=3))
    assert all(c.assignments.dtype == torch.int32 for c in clusters.clusterings)
    moved = clusters.to("meta")  # any other device: nothing of size N follows
    assert all(c.prototypes.device.type == "meta" for c in moved.clusterings)
    assert all(c.assignments.device.type == "cpu" for c in moved.clusterings)
    index = torch.tensor([3, 0, 59])
    expected = torch.stack([c.assignments[index].long() for c in clusters.clusterings])
    assert torch.equal(moved.positives(index), expected)  # (M, B) int64
