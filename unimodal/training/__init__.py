"""Lightning: thin modules over the plain models (`modules`), data modules (`datamodules`), callbacks
(`callbacks`), the LightningCLI fit programs (`fit`) and the loggers (`loggers`)."""
