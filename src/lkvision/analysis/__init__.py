"""lkvision.analysis"""
