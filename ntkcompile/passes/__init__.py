"""Passes that rewrite a traced torch.fx graph into Tensor Program form."""
