"""Chapter 5 bonus: hyperparameter search for pretraining with Optuna (`hparam_search.py`, `hparam-search.ipynb`).

    python -m ch05.hparam_tuning.hparam_search --quick --study-db outputs/ch05/hparam.db --trials 8
"""
