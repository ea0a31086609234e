# hyv3-max Mojo kernels, loaded by MAX as a custom_extensions package.
