"""The purchase model: its inputs (``inputs``), the River pipeline and its snapshots
(``purchase_model``), fast exact scoring (``scoring``), learning under delayed labels
(``feedback``) and prequential evaluation with the learner step (``prequential``)."""
