import pytest
import torch
from sklearn.datasets import load_digits

from simclr_cli.engine.knn import knn_predict, topk_accuracy
from simclr_cli.engine.linear_probe import fit_linear_probe, select_and_fit


def test_top5_with_fewer_neighbours_than_5_counts_only_voted_classes() -> None:
    # 3 neighbours all of class 0: the 9 queries of classes 1..9 have no voter for their class,
    # so their top-5 must be wrong, whatever order topk gives the unvoted (zero) classes.
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 0, 0, 9])
    queries = torch.tensor([[1.0, 0.05]]).repeat(9, 1)
    labels = torch.arange(1, 10)
    scores = knn_predict(bank, bank_labels, queries, num_classes=10, k=3)
    assert topk_accuracy(scores, labels, 5) == 0.0
    assert topk_accuracy(scores, torch.zeros(9, dtype=torch.long), 5) == 1.0


@pytest.mark.parametrize("temperature", [0.1, None])
def test_scaling_a_query_or_the_bank_changes_nothing(temperature: float | None) -> None:
    # Cosine similarity on L2-normalised vectors: a query x100 (or a bank /7) votes the same.
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=generator)
    bank_labels = torch.randint(0, 4, (50,), generator=generator)
    queries = torch.randn(6, 8, generator=generator)
    plain = knn_predict(bank, bank_labels, queries, num_classes=4, k=5, temperature=temperature)
    scaled = knn_predict(
        bank / 7, bank_labels, queries * 100, num_classes=4, k=5, temperature=temperature
    )
    torch.testing.assert_close(plain, scaled, rtol=1e-5, atol=0)  # float32 rounding only
    assert torch.equal(plain.argmax(dim=1), scaled.argmax(dim=1))


def test_majority_vote_ties_go_to_the_closer_class() -> None:
    # Two neighbours each for classes 1 and 2; class 2's are more similar, so 2 wins the tie,
    # and a class with more votes still beats closer but fewer ones.
    bank = torch.tensor([[1.0, 0.3], [1.0, -0.3], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0]])
    bank_labels = torch.tensor([1, 1, 2, 2, 3])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(bank, bank_labels, query, num_classes=4, k=4, temperature=None)
    assert int(scores.argmax()) == 2
    bank_labels = torch.tensor([1, 1, 2, 1, 3])  # now class 1 has 3 of the 4 votes
    scores = knn_predict(bank, bank_labels, query, num_classes=4, k=4, temperature=None)
    assert int(scores.argmax()) == 1


def test_linear_probe_on_real_digits_converges_and_classifies() -> None:
    digits = load_digits()
    x, y = torch.tensor(digits.data).float(), torch.tensor(digits.target)
    probe, by_decay = select_and_fit(x[:1000], y[:1000], x[1000:1300], y[1000:1300], num_classes=10)
    accuracy = float((probe.scores(x[1300:]).argmax(1) == y[1300:]).float().mean())
    assert probe.converged and probe.gradient_norm < 1e-5
    assert accuracy > 0.9, accuracy
    assert set(by_decay) and all(0 <= a <= 1 for a in by_decay.values())


def test_probe_ignores_feature_scale() -> None:
    # Features are standardised first: scaling every feature by 1000 gives the same classifier.
    digits = load_digits()
    x, y = torch.tensor(digits.data[:600]).float(), torch.tensor(digits.target[:600])
    small = fit_linear_probe(x, y, num_classes=10, weight_decay=1e-3)
    large = fit_linear_probe(x * 1000, y, num_classes=10, weight_decay=1e-3)
    assert torch.equal(small.scores(x).argmax(1), large.scores(x * 1000).argmax(1))
