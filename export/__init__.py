"""tokprune.export"""
