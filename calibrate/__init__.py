"""tokprune.calibrate"""
