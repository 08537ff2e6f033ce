"""lkvision.train"""
