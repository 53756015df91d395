"""SGLang integration: the radix-cache plugin and CPU development mode."""
