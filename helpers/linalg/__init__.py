"""Linear algebra: the rank rule, kernel bases of a first layer, and a convolution as an operator."""
