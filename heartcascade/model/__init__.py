"""The trained-model contract between training and inference: networks built from the plans
(:mod:`.from_plans`) and the checkpoint format (:mod:`.checkpoint`). See documentation/conventions.md,
"Trained model folders"."""
