"""tokprune.runtime"""
