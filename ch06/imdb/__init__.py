"""Chapter 6 bonus: classifying IMDb movie reviews, or any labelled text, with GPT-2, encoder models and a
bag-of-words baseline (the book's ch06/03_bonus_imdb-classification).

    python -m ch06.imdb.download_prepare_dataset          # IMDb's 50k reviews -> train/validation/test.csv
    python -m ch06.imdb.train_gpt --quick                 # our GPT-2 (chapter 6's listings)
    python -m ch06.imdb.train_bert_hf --model bert-base-uncased   # a transformers encoder (BERT, RoBERTa, ...)
    python -m ch06.imdb.train_sklearn_logreg              # logistic regression on word counts
    python -m ch06.imdb --quick                           # all three on the same data, one table
"""
