"""Training data of the reward model: preference pairs (records, batches) and the demo data made
from the tiny editor."""
