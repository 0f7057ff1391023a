"""What leaves the process: model cards (facts.py gathers what a card says, cards.py renders it), saving with the
card, uploading and exporting (export.py: save_adapter, push_to_hub, merge for serving, IA3), and the offline model
aliases (models.py). It sits just above the tuner, so fit results and evaluations can write AUSteer cards."""
