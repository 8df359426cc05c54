"""LightningDataModules that produce ``lit_transfusion.batch.Batch``."""
