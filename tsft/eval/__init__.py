"""Metrics and answer extraction per benchmark."""
