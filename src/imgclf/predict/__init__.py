"""Everything after training: rebuild a model from its run folder and predict."""
