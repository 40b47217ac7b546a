"""What the evaluate stage measures, each as the field does: bits per byte and statistics
(scoring), translation (translation), generation (generation), multiple-choice and cloze tasks
(tasks), question answering (qa), and the one-page report (report)."""
