"""End-to-end recipes on top of train/, predict/ and evaluate/: training a two-stage classifier
(`two_stage`) and saving a scored ensemble folder (`ensemble`). The models they write are opened
by predict/ (`load_predictor`), which never imports train/ or this package.
"""
