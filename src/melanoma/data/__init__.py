"""① Labelled images in: records and the dataset index, image decoding, data sources (folders, manifests, ISIC
Archive downloads), official ground truth, metadata, and the train and evaluation transforms."""
