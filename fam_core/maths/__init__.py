"""The explanation maths, once: pure tensor functions shared by the explainers and the ONNX
heads (channel contributions, similarity decompositions).
"""
