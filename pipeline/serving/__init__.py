"""The playground: a local web page to try a trained model (engine: many requests decoded together;
card: what the model is and how it scored; app: the HTTP routes and the page). `python -m pipeline.serve`."""
