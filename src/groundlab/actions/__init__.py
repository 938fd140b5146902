"""One module per action; which function runs for a model and an action is decided in groundlab.recipes."""
