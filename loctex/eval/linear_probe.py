"""The VOC07 linear-SVM protocol (VirTex's ``scripts/clf_voc07.py``), the one implementation that
``loctex eval voc07`` and ``loctex reproduce``'s linear probe share.

Per class, a one-vs-all ``LinearSVC`` (squared hinge, L2, ``class_weight={1: 2, -1: 1}``) for each
cost in {0.01, 0.1, 1, 10}; the cost with the best 3-fold cross-validated AP on trainval is refit on
all of trainval and scored by AP on test; mAP is the mean over classes.

Labels use VOC's own convention: ``1`` present, ``-1`` absent, ``0`` difficult. Difficult images
are left out of the test AP. In training VirTex's code (and the FAIR benchmark it follows) keeps them
as negatives -- its loader marks them "ignore" but the SVM maps every non-positive to -1 -- so
``difficult_in_training="negative"`` is the default; ``"ignore"`` drops them from training instead.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

SVM_COSTS = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 3


@dataclass
class ClassResult:
    ap: float          # test AP; nan when the class cannot be scored (see `note`)
    cost: float        # the cost that cross-validation picked
    cv_ap: float       # its mean cross-validated AP on trainval
    note: str = ""


def _svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge",
                     max_iter=2000, random_state=seed)


def train_test_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, costs=SVM_COSTS, folds: int = CV_FOLDS,
                   difficult_in_training: str = "negative", seed: int = 0) -> ClassResult:
    """One class: ``train_y``/``test_y`` in {1, -1, 0 (difficult)}; features already normalized."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if difficult_in_training not in ("negative", "ignore"):
        raise ValueError(f"difficult_in_training must be 'negative' or 'ignore', "
                         f"got {difficult_in_training!r}")
    keep = np.ones(len(train_y), bool) if difficult_in_training == "negative" else train_y != 0
    x, y = train_x[keep], np.where(train_y[keep] == 1, 1, -1)
    n_pos, n_neg = int((y == 1).sum()), int((y == -1).sum())
    scored = test_y != 0
    test_pos = int((test_y[scored] == 1).sum())
    if n_pos == 0 or n_neg == 0:
        return ClassResult(float("nan"), float("nan"), float("nan"),
                           f"trainval has {n_pos} positives and {n_neg} negatives")
    if test_pos == 0:
        return ClassResult(float("nan"), float("nan"), float("nan"), "no positive test image")

    best_cost, best_cv = costs[0], -1.0
    # Cross-validation needs a positive in every fold; tiny classes use fewer folds.
    k = min(folds, n_pos, n_neg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cost in costs:
            if k >= 2:
                cv = StratifiedKFold(n_splits=k)  # unshuffled, as cross_val_score(cv=3) does
                cv_ap = float(cross_val_score(_svm(cost, seed), x, y, cv=cv,
                                              scoring="average_precision").mean())
            else:
                cv_ap = float("nan")
            if cv_ap > best_cv:  # strict: ties keep the smaller cost, as VirTex does
                best_cost, best_cv = cost, cv_ap
        clf = _svm(best_cost, seed).fit(x, y)
    scores = clf.decision_function(test_x[scored])
    ap = float(average_precision_score(test_y[scored] == 1, scores))
    note = "" if k == folds else f"{k}-fold CV ({n_pos} positives)" if k >= 2 else "no CV"
    return ClassResult(ap, best_cost, best_cv if k >= 2 else float("nan"), note)


def svm_map(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            class_names: list[str], costs=SVM_COSTS, folds: int = CV_FOLDS,
            difficult_in_training: str = "negative", n_jobs: int | None = None,
            seed: int = 0) -> dict:
    """All classes: ``*_y`` are [N, C] in {1, -1, 0}. Returns ``{"mAP", "per_class", "skipped"}``;
    classes without a positive in trainval or test are skipped (listed, not averaged)."""
    from joblib import Parallel, delayed

    train_x = np.ascontiguousarray(train_x, dtype=np.float32)
    test_x = np.ascontiguousarray(test_x, dtype=np.float32)
    C = len(class_names)
    if train_y.shape[1] != C or test_y.shape[1] != C:
        raise ValueError(f"labels have {train_y.shape[1]}/{test_y.shape[1]} columns for {C} classes")
    n_jobs = n_jobs or min(C, os.cpu_count() or 1)
    results = Parallel(n_jobs=n_jobs)(
        delayed(train_test_svm)(train_x, train_y[:, c], test_x, test_y[:, c], costs, folds,
                                difficult_in_training, seed) for c in range(C))
    per_class = {name: vars(r) for name, r in zip(class_names, results)}
    aps = [r.ap for r in results if not np.isnan(r.ap)]
    return {"mAP": float(np.mean(aps)) if aps else float("nan"),
            "per_class": per_class,
            "skipped": [n for n, r in zip(class_names, results) if np.isnan(r.ap)]}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
