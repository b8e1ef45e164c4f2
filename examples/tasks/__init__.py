"""Example tasks: the data (generated or shipped offline) together with the LightningModule that trains on it."""
