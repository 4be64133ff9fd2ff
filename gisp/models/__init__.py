"""Model families as data, the structure of a decoder (heads, channels, parameter accounting), and loading."""
