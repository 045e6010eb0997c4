"""C kernels for the CPU: `.c` files in this folder, compiled and loaded by `build.load_kernel`."""
